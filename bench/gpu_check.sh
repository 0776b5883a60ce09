#!/usr/bin/env bash
# One pass of GPU checks for llama3-server, on a CUDA machine with PyTorch and no network, in under 9 minutes:
# the device, the SDPA kernels the model runs, the GPU tests, bf16 parity against CPU float32, decode (through the
# CUDA graphs) and prefill throughput of a random Llama 3.2 1B against the measured memory bandwidth, transformers'
# continuous batching on that model, and the benchmark client against our server, set against the CUDA path's targets
# for an H200 (batch 1 at 75% of the bandwidth limit, 5x transformers at 256, TTFT p50 under 50 ms at 32).
#
#   bench/gpu_check.sh                      # on the GPU machine
#   bench/gpu_check.sh --device cpu --quick # dry run on a CPU, tiny sizes
#
# Packages the machine lacks are installed, without an index, from the wheels in .wheels/ (bench/fetch_wheels.sh
# downloads them) into a throw-away folder on PYTHONPATH. Results go to $OUT/gpu_check when OUT is set, else
# bench/results/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}/gpu_check
mkdir -p "$RESULTS"

# What the server needs and this Python lacks, or has in a version older than the one the tests passed with,
# pinned; numpy and torch are taken as given.
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pins=.wheels/constraints-$pyver.txt
if [ ! -f "$pins" ]; then
    if "$PYTHON" -c 'import fastapi, uvicorn, pydantic, gguf, prometheus_client, jinja2, yaml, tiktoken, safetensors, httpx' \
        2>/dev/null; then
        pins=/dev/null  # e.g. this project's own .venv: nothing to install
    else
        echo "no $pins: run bench/fetch_wheels.sh where there is network (it fetches for Python 3.10 to 3.13)" >&2
        exit 2
    fi
fi
needed=$("$PYTHON" - "$pins" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

def older(have: str, want: str) -> bool:
    try:
        from packaging.version import Version
        return Version(have) < Version(want)
    except Exception:
        return False

out = []
for line in open(sys.argv[1]):
    name, _, pin = line.strip().partition("==")
    if not name:
        continue
    try:
        if older(version(name), pin):
            out.append(f"{name}=={pin}")
    except PackageNotFoundError:
        out.append(f"{name}=={pin}")
print(" ".join(out))
PY
)
if [ -n "$needed" ]; then
    # Into a throw-away folder put first on PYTHONPATH: the system's packages stay as they are.
    site=$(mktemp -d)/site
    echo "installing from .wheels into $site: $needed"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links .wheels --target "$site" $needed
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

exec timeout --kill-after=10 540 "$PYTHON" bench/gpu_check.py --out "$RESULTS" "$@"
