"""Speculative decoding on and off, side by side over HTTP, on the default model.

    python bench/speculation_bench.py [--rounds 2] [--spec '{"method": "ngram", ...}'] [--temperature 0]

Two workloads, written to JSON-lines files of completion prompts: input-grounded (the answer copies from the
prompt: a code file rewritten with one change, a passage quoted, a list continued) and free-form (short questions
to write about). For each round, our server is started without and then with `--speculative-config` (alternated),
and our load client (`python -m server.bench`) drives each workload at 1 and at 16 concurrent streams, greedy
(or sampled at `--temperature`), 128 output tokens (ignore_eos). Prints output tok/s and time per output token for each, the ratio on / off, and the
acceptance (from the server's vLLM spec_decode counters on /metrics).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.launch import stop, wait_healthy  # noqa: E402

SPEC = '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
PORT = 8000
CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total += (value - m) ** 2
    return total / len(values)


def describe(values):
    return {"mean": mean(values), "variance": variance(values), "count": len(values)}
'''
PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
           "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, and "
           "to crown the centennial anniversary of the French Revolution.")


def grounded_prompts() -> list[str]:
    renamed = CODE.replace("values", "items")
    return [
        f"{CODE}\n# The same file with the parameter `values` renamed to `items`:\n\n{renamed[:40]}",
        f"{CODE}\n# The same file, unchanged:\n\n{CODE[:30]}",
        f"Passage: {PASSAGE}\n\nQuote the passage word for word.\nQuote: {PASSAGE[:40]}",
        f"Passage: {PASSAGE}\n\nRepeat the first two sentences.\nRepeat: The Eiffel Tower",
        "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday, Wednesday,",
        "1. apples\n2. pears\n3. plums\n4. grapes\n5. lemons\n\nThe same list again:\n1. apples\n2.",
        f"Text: {PASSAGE}\n\nThe text again, in full: {PASSAGE[:25]}",
        f"{CODE}\n# A copy of `variance`:\n\ndef variance(",
    ]


def free_prompts() -> list[str]:
    topics = ["the ocean", "a robot", "winter", "mathematics", "a cat", "the moon", "coffee", "trains"]
    return [f"Write a short story about {t}.\n\nStory:" for t in topics]


def spec_counters(url: str) -> tuple[float, float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text

    def value(name: str) -> float:
        match = re.search(rf"^vllm:{name}_total{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0
    return value("spec_decode_num_drafts"), value("spec_decode_num_draft_tokens"), \
        value("spec_decode_num_accepted_tokens")


def bench(url: str, dataset: Path, concurrency: int, out: Path, temperature: float) -> dict:
    num = 8 if concurrency == 1 else 16
    subprocess.run([sys.executable, "-m", "server.bench", "--base-url", url, "--dataset", str(dataset),
                    "--output-len", "128", "--temperature", str(temperature), "--max-concurrency", str(concurrency),
                    "--num-prompts", str(num), "--warmup", "1", "--no-progress", "--json", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    return json.loads(out.read_text())["runs"][0]["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spec", default=SPEC)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    datasets = {}
    for name, prompts in (("grounded", grounded_prompts()), ("free", free_prompts())):
        datasets[name] = work / f"{name}.jsonl"
        datasets[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    url = f"http://127.0.0.1:{PORT}"
    rows = []
    for round_ in range(1, args.rounds + 1):
        for mode in ("off", "on"):
            command = [sys.executable, "-m", "server", "--port", str(PORT), "--log-level", "warning",
                       "--no-compile-in-background"]  # healthy once compiled: both modes timed compiled
            if mode == "on":
                command += ["--speculative-config", args.spec]
            server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                wait_healthy(url, server, 900)
                for name, dataset in datasets.items():
                    for concurrency in (1, 16):
                        before = spec_counters(url)
                        s = bench(url, dataset, concurrency, work / f"{mode}-{name}-{concurrency}-{round_}.json",
                                  args.temperature)
                        after = spec_counters(url)
                        drafts, proposed, accepted = (a - b for a, b in zip(after, before))
                        rows.append((round_, name, concurrency, mode, s["output_token_throughput"],
                                     s["tpot_ms"]["median"], accepted / proposed if proposed else None,
                                     accepted / drafts if drafts else None))
                        print(f"round {round_} {name:8} {concurrency:>2} streams, speculation {mode:3}: "
                              f"{rows[-1][4]:7.1f} tok/s", flush=True)
            finally:
                stop(server)
    print(f"\n{'round':>5} {'workload':<9} {'streams':>7} {'off tok/s':>9} {'on tok/s':>9} {'on/off':>6} "
          f"{'TPOT off':>8} {'TPOT on':>8} {'accepted':>8} {'per draft':>9}")
    for round_ in range(1, args.rounds + 1):
        for name in datasets:
            for concurrency in (1, 16):
                off, on = (next(r for r in rows if r[:4] == (round_, name, concurrency, m)) for m in ("off", "on"))
                rate = f"{on[6]:.0%}" if on[6] is not None else "-"
                per = f"{on[7]:.2f}" if on[7] is not None else "-"
                print(f"{round_:>5} {name:<9} {concurrency:>7} {off[4]:>9.1f} {on[4]:>9.1f} {on[4] / off[4]:>5.2f}x "
                      f"{off[5]:>7.1f}ms {on[5]:>7.1f}ms {rate:>8} {per:>9}")


if __name__ == "__main__":
    main()
