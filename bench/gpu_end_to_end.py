"""The end-to-end half of bench/gpu_check.py: a random-weight model saved as a Hugging Face directory, then
`transformers`' continuous batching (`generate_batch`) and our HTTP server with the benchmark client, on it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import stop, wait_healthy  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.paths import llama3_tokenizer_path  # noqa: E402
from model.text.chat_template import LLAMA3_CHAT_TEMPLATE  # noqa: E402


def random_state(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Weights that keep activations in range: N(0, 1/fan_in) matrices, unit norms, N(0, 1) embeddings."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {}
    for name, shape in shapes.items():
        if "norm" in name:
            state[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            state[name] = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)
    return state


def save_hf_directory(model: Llama, directory: Path) -> None:
    """config.json, model.safetensors and Meta's Llama 3 tokenizer with a chat template: what `--model DIR` loads."""
    from safetensors.torch import save_file

    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**config.to_hf_config(), "torch_dtype": "bfloat16"}))
    shutil.copy(llama3_tokenizer_path(), directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
         "chat_template": LLAMA3_CHAT_TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))


def model_directory(ctx: dict) -> Path:
    """The benchmark model as a Hugging Face directory (made once, removed at exit), for transformers and the
    server; the model itself is then dropped from the device."""
    if "model_dir" not in ctx:
        model = ctx.pop("bench_model", None)
        if model is None:  # the throughput section failed before building it
            config = ctx["bench_config"]
            model = build_model(config, random_state(config, ctx["device"], ctx["dtype"], seed=2).items(),
                                device=ctx["device"], dtype=ctx["dtype"])
        ctx["model_tmp"] = tempfile.TemporaryDirectory(prefix="gpu-check-model-")
        ctx["model_dir"] = Path(ctx["model_tmp"].name)
        save_hf_directory(model, ctx["model_dir"])
        del model
        if ctx["device"].type == "cuda":
            torch.cuda.empty_cache()
    return ctx["model_dir"]


def section_transformers(ctx: dict) -> dict:
    """`transformers`' continuous batching (generate_batch) on the same model, greedy, with the server
    benchmark's largest level of prompts: hf_prompts random prompts of input_len tokens, output_len new tokens."""
    import inspect

    import transformers

    device, sizes = ctx["device"], ctx["sizes"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_directory(ctx), dtype=ctx["dtype"]).to(device)
    model.eval()
    config = transformers.GenerationConfig(max_new_tokens=sizes["output_len"], do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    accepted = inspect.signature(model.generate_batch).parameters
    extra = {"progress_bar": False} if "progress_bar" in accepted else {}
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128_000, (sizes["input_len"],), generator=gen).tolist()
               for _ in range(sizes["hf_prompts"])]
    start = time.perf_counter()
    if not ctx["quick"]:  # warm-up, untimed (a dry run only checks that the section works)
        model.generate_batch(inputs=prompts[:4], generation_config=transformers.GenerationConfig(
            max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0), **extra)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, **extra)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ctx["transformers_tok_s"] = tokens / seconds
    return {"transformers": transformers.__version__, "attn_implementation": "as generate_batch chose",
            "requests": len(prompts), "output_tokens": tokens, "seconds": round(seconds, 2),
            "warmup_seconds": round(warmup, 2), "output_token_throughput": round(tokens / seconds, 1)}


def section_server(ctx: dict) -> dict:
    device, sizes, out = ctx["device"], ctx["sizes"], ctx["out"]
    directory = model_directory(ctx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "server", "--model", str(directory), "--device", str(device),
                  "--dtype", "bfloat16", "--port", str(port), "--served-model-name", "random-" + ctx["bench_config"].name,
                  "--max-model-len", "1024", "--max-num-seqs", str(sizes["max_num_seqs"]),
                  "--max-num-batched-tokens", "4096", "--log-level", "info"]
    if device.type == "cuda":  # leave this process and the next section room on the device
        server_cmd += ["--gpu-memory-utilization", "0.6"]
    log_path = out / "server.log"
    with open(log_path, "w") as log:
        start = time.monotonic()
        server = subprocess.Popen(server_cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            try:
                wait_healthy(url, server, sizes["server_wait"])
            except RuntimeError as e:
                raise RuntimeError(f"{e}; its log ends:\n{log_path.read_text()[-3000:]}") from None
            startup = time.monotonic() - start
            bench_cmd = [sys.executable, "-m", "server.bench", "--base-url", url, "--sweep-concurrency",
                         sizes["levels"], "--num-prompts", sizes["prompts"], "--input-len", str(sizes["input_len"]),
                         "--output-len", str(sizes["output_len"]), "--warmup", "2", "--no-progress",
                         "--json", str(out / "bench.json")]
            print("$", " ".join(bench_cmd[1:]), flush=True)
            left = max(30.0, ctx["deadline"] - time.monotonic())
            done = subprocess.run(bench_cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", flush=True)
            if done.returncode != 0:
                raise RuntimeError(f"the benchmark exited with {done.returncode}")
        finally:
            stop(server)
    # What the server said about its cache and its decode step, for the record.
    said = [line.strip()[:300] for line in log_path.read_text().splitlines()
            if any(k in line for k in ("KV cache", "CUDA memory", "decode step", "decoding eagerly"))]
    report = json.loads((out / "bench.json").read_text())
    levels = {run["max_concurrency"]: {k: run["summary"][k] for k in ("completed", "failed", "output_token_throughput")}
              | {"ttft_p50_ms": run["summary"]["ttft_ms"]["median"], "tpot_p50_ms": run["summary"]["tpot_ms"]["median"]}
              for run in report["runs"]}
    return {"startup_seconds": round(startup, 1), "log": said, "levels": levels}
