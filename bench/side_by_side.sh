#!/usr/bin/env bash
# Our server against llama.cpp's llama-server on this machine: the same load client, prompts and settings, the
# two servers alternated for ROUNDS rounds so that a noisy machine affects both alike.
#
#   bench/side_by_side.sh [ROUNDS]   # default 2; needs `../shared/peers/llama-server.sh build` once
#
# Each run: 128-token prompts, 128 output tokens (ignore_eos, greedy), streamed, at 1, 4 and 16 concurrent
# requests (4, 8 and 16 requests). Extra flags for our server: SERVE_ARGS="--enforce-eager" bench/side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
PY=${PY:-.venv/bin/python}
PEER=${PEER:-../shared/peers/llama-server.sh}
OUT=${OUT:-bench/results/side_by_side}
mkdir -p "$OUT"

wait_healthy() {
    for _ in $(seq 600); do
        if curl -sf "http://127.0.0.1:$1/health" > /dev/null; then return 0; fi
        sleep 1
    done
    echo "server on port $1 never became healthy" >&2
    return 1
}

run_bench() {  # NAME PORT ROUND
    "$PY" -m server.bench --base-url "http://127.0.0.1:$2" --input-len 128 --output-len 128 \
        --sweep-concurrency 1,4,16 --num-prompts 4,8,16 --warmup 1 --no-progress --json "$OUT/$1-$3.json" \
        > "$OUT/$1-$3.txt"
}

stop() { kill "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }

for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    # healthy once compiled (by default it serves eagerly while compiling): timed on the compiled step
    "$PY" -m server --port 8000 --no-compile-in-background ${SERVE_ARGS:-} > "$OUT/ours-$round.log" 2>&1 &
    ours=$!
    wait_healthy 8000 && run_bench ours 8000 "$round"
    stop "$ours"
    bash "$PEER" run 8103 > "$OUT/llama-server-$round.log" 2>&1 &
    peer=$!
    wait_healthy 8103 && run_bench llama-server 8103 "$round"
    stop "$peer"
    pkill -f "llama-server .*--port 8103" 2> /dev/null || true
done

"$PY" - "$OUT" "$ROUNDS" <<'PY'
import json, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
print(f"{'round':>5} {'server':<13} {'streams':>7} {'out tok/s':>9} {'TTFT p50 ms':>11} {'TPOT p50 ms':>11}")
for r in range(1, rounds + 1):
    rates = {}
    for name in ("ours", "llama-server"):
        for run in json.loads((out / f"{name}-{r}.json").read_text())["runs"]:
            s, c = run["summary"], run["max_concurrency"]
            rates[name, c] = s["output_token_throughput"]
            print(f"{r:>5} {name:<13} {c:>7} {s['output_token_throughput']:>9.1f} {s['ttft_ms']['median']:>11.0f} "
                  f"{s['tpot_ms']['median']:>11.1f}")
    print("      ours / llama-server: " + ", ".join(f"{c} streams {rates['ours', c] / rates['llama-server', c]:.2f}x"
                                                  for c in (1, 4, 16)))
PY
