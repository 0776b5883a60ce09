"""The Python half of bench/gpu_check.sh: one pass over what a GPU run should tell us, on random-weight models.

    python bench/gpu_check.py [--device cuda] [--quick] [--out DIR]

Sections: the device; which SDPA kernels the model's attention runs; the GPU tests (the paged attention kernel,
graph replay against eager, bf16 against CPU float32); greedy parity of the device in bf16 against CPU float32 on a
tiny model; decode tokens/s at several batch sizes (through the CUDA graphs the server captures, and eagerly at
batch 1) and prefill tokens/s for a Llama 3.2 1B-shaped model, with batch 1 set against the memory-bandwidth limit
measured by a device-to-device copy; speculative decoding's verify rows on the device and a verify step's cost
(gpu_speculation.py); `transformers`' continuous batching (`generate_batch`) on the same model and
prompts; and the benchmark client against our server serving that model from a temporary Hugging Face directory.
The summary sets the figures against the CUDA path's targets (TARGETS). The last two sections are in
gpu_end_to_end.py. `--quick` shrinks every size so the whole pass runs on a CPU in a minute or two. A failing section is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_end_to_end import random_state, section_server, section_transformers  # noqa: E402
from gpu_speculation import section_speculation  # noqa: E402

from model.batch import ForwardBatch, SequenceChunk  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.kv_cache import KVCache  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.loading import build_model  # noqa: E402
from model.paths import llama3_tokenizer_path  # noqa: E402

TINY = dict(vocab_size=128_256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=False)
ATTENTION_KERNEL_HINTS = ("scaled_dot_product", "flash", "fmha", "efficient_attention", "sdpa", "cudnn")
FULL = dict(batches=(1, 16, 64, 256), context=512, steps=32, prefill=2048, copy_mib=2048, parity_steps=16,
            levels="1,32,256", prompts="16,128,768", input_len=128, output_len=128, server_wait=300,
            hf_prompts=256, max_num_seqs=256)
QUICK = dict(batches=(1, 4), context=32, steps=4, prefill=128, copy_mib=128, parity_steps=16,
             levels="1,4", prompts="2,6", input_len=32, output_len=8, server_wait=120, hf_prompts=6, max_num_seqs=4)
BLOCK = 16  # the server's default block size
TARGETS = {"batch1_fraction": 0.75, "vs_transformers": 5.0, "ttft_p50_ms_at_32": 50.0}  # the CUDA path's, on an H200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `repeats` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def section_device(ctx: dict) -> dict:
    device = ctx["device"]
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return info


def section_sdpa(ctx: dict) -> dict:
    """Which SDPA backends are enabled, which accept our two call shapes, and which kernels the model runs."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype, shape = ctx["device"], ctx["dtype"], ctx["bench_config"]
    enabled = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
               for name in ("flash", "mem_efficient", "math", "cudnn")}
    H, Hkv, D, L = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, 512
    q_dec = torch.randn(16, H, 1, D, device=device, dtype=dtype)  # decode group: one query per sequence, a mask
    kv = torch.randn(16, Hkv, L, D, device=device, dtype=dtype)
    mask = torch.ones(16, 1, 1, L, dtype=torch.bool, device=device)
    q_pre = torch.randn(1, H, L, D, device=device, dtype=dtype)  # prefill: causal, no mask
    sdpa = F.scaled_dot_product_attention
    calls = {"decode (bool mask)": lambda: sdpa(q_dec, kv, kv, attn_mask=mask, enable_gqa=True),
             "prefill (causal)": lambda: sdpa(q_pre, kv[:1], kv[:1], is_causal=True, enable_gqa=True)}
    trials = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for call_name, call in calls.items():
            try:
                with sdpa_kernel(backend):
                    call()
                sync(device)
                trials[f"{backend.name} / {call_name}"] = "ok"
            except Exception as e:  # a backend that cannot take this call says why
                trials[f"{backend.name} / {call_name}"] = str(e).strip().splitlines()[0][:100]
    # One layer with the benchmark model's attention shape: the kernels its attention gets, cheaply.
    one = ModelConfig(vocab_size=1024, hidden_size=shape.hidden_size, num_hidden_layers=1, num_attention_heads=H,
                      num_key_value_heads=Hkv, head_dim=D, intermediate_size=256, name="one-layer")
    model = build_model(one, random_state(one, device, dtype, seed=3).items(), device=device, dtype=dtype)
    cache = KVCache(one, 2, 64, dtype=dtype, device=device)
    batches = {"prefill": ForwardBatch.build([SequenceChunk(0, 0, list(range(1, 33)))], device),
               "decode": ForwardBatch.build([SequenceChunk(0, 32, [5]), SequenceChunk(1, 10, [6])], device)}
    model(batches["prefill"], cache)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    used = {}
    for name, batch in batches.items():
        with torch.profiler.profile(activities=activities) as prof:
            model(batch, cache)
            sync(device)
        names = {e.key for e in prof.key_averages()}
        used[name] = sorted(n[:120] for n in names if any(k in n.lower() for k in ATTENTION_KERNEL_HINTS))
    return {"enabled": enabled, "trials": trials, "model_kernels": used}


def greedy(model, prompt: list[int], steps: int, device: torch.device, forced: list[int] | None = None):
    """Greedy tokens and per-step logits; with `forced`, feed those tokens instead of its own (teacher forcing)."""
    cache = KVCache(model.config, 1, len(prompt) + steps + 1, dtype=next(model.parameters()).dtype, device=device)
    chunk = SequenceChunk(0, 0, prompt)
    tokens, all_logits = [], []
    for i in range(steps):
        logits = model(ForwardBatch.build([chunk], device), cache)[-1].float().cpu()
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        chunk = SequenceChunk(0, len(prompt) + i, [forced[i] if forced is not None else tokens[-1]])
    return tokens, all_logits


def section_parity(ctx: dict) -> dict:
    """The device in bf16 against CPU float32, same weights: greedy tokens, and at any disagreement the
    reference's margin between its top two logits (a near-tie is a rounding call, not a bug)."""
    from model.text.tokenizer import Tokenizer

    device, steps = ctx["device"], ctx["sizes"]["parity_steps"]
    config = ModelConfig(**TINY, name="tiny-parity")
    state = random_state(config, torch.device("cpu"), torch.float32, seed=1)
    reference = build_model(config, state.items(), device="cpu", dtype=torch.float32)
    candidate = build_model(config, state.items(), device=device, dtype=torch.bfloat16)
    prompt = Tokenizer.from_tiktoken_file(llama3_tokenizer_path()).encode_prompt("The capital of France is")
    ref_tokens, ref_logits = greedy(reference, prompt, steps, torch.device("cpu"))
    free_tokens, _ = greedy(candidate, prompt, steps, device)
    forced_tokens, dev_logits = greedy(candidate, prompt, steps, device, forced=ref_tokens)
    errors = [float((a - b).abs().max()) for a, b in zip(ref_logits, dev_logits)]
    disagreements = []
    for i, (r, c) in enumerate(zip(ref_tokens, forced_tokens)):
        if r != c:
            top2 = ref_logits[i].topk(2).values
            disagreements.append({"step": i, "reference_margin": float(top2[0] - top2[1]),
                                  "max_logit_error": errors[i]})
    agree = next((i for i, (a, b) in enumerate(zip(ref_tokens, free_tokens)) if a != b), steps)
    near_ties = all(d["reference_margin"] <= 2 * d["max_logit_error"] for d in disagreements)
    return {"steps": steps, "greedy_steps_agreeing": agree, "passed": agree == steps or near_ties,
            "teacher_forced_disagreements": disagreements, "max_abs_logit_error": max(errors),
            "logit_std": float(torch.stack(ref_logits).std()), "reference_tokens": ref_tokens,
            "device_tokens": free_tokens}


def model_speed(model: Llama, sizes: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Decode tokens/s per batch size over a filled context, through the decode step the server runs (CUDA graphs
    on a GPU), and eagerly at batch 1; prefill tokens/s of one long prompt."""
    from server.worker.decode.graphs import CapturedDecode

    batches, context, steps = sizes["batches"], sizes["context"], sizes["steps"]
    per_sequence = -(-(context + steps + 1) // BLOCK)
    n = max(batches)
    cache = KVCache(model.config, n * per_sequence, BLOCK, dtype=dtype, device=device)
    tables = [tuple(range(i * per_sequence, (i + 1) * per_sequence)) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    for table in tables:  # every sequence's context filled once, as serving would have
        ids = torch.randint(0, 128_000, (context,), generator=gen).tolist()
        model(ForwardBatch.build([SequenceChunk(0, 0, ids, blocks=table)], device, BLOCK), cache)
    step = CapturedDecode(model, cache, n, per_sequence * BLOCK, device)
    captured = device.type == "cuda" and step.prepare()

    def graphed(b):
        def run():
            for i in range(steps):
                step.run([7 + s for s in range(b)], [context + i] * b, tables[:b])
        return run

    def eager(b):
        batches_ = [ForwardBatch.build([SequenceChunk(0, context + i, [7 + s], blocks=tables[s]) for s in range(b)],
                                       device, BLOCK) for i in range(steps)]

        def run():
            for batch in batches_:
                model(batch, cache)
        return run

    decode = {b: b * steps / timed(graphed(b) if captured else eager(b), device) for b in batches}
    eager1 = steps / timed(eager(1), device)
    step.graphs.clear()  # the graphs and the cache go before the prefill cache comes
    prompt = torch.randint(0, 128_000, (sizes["prefill"],), generator=gen).tolist()
    blocks = -(-sizes["prefill"] // BLOCK)
    cache = KVCache(model.config, blocks, BLOCK, dtype=dtype, device=device)
    prefill_batch = ForwardBatch.build([SequenceChunk(0, 0, prompt, blocks=tuple(range(blocks)))], device, BLOCK)
    prefill = sizes["prefill"] / timed(lambda: model(prefill_batch, cache), device)
    return {"decode": decode, "decode_eager_batch1": eager1, "prefill": prefill,
            "decode_step": step_mode(captured, device)}


def step_mode(captured: bool, device: torch.device) -> str:
    return "CUDA graphs" if captured else f"eager on {device.type}"


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    src = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: [dst.copy_(src) for _ in range(5)], device) / 5
    return 2 * src.numel() / seconds


def section_throughput(ctx: dict) -> dict:
    device, dtype, sizes, config = ctx["device"], ctx["dtype"], ctx["sizes"], ctx["bench_config"]
    model = build_model(config, random_state(config, device, dtype, seed=2).items(), device=device, dtype=dtype)
    ctx["bench_model"] = model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head counts once
    speed = model_speed(model, sizes, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bandwidth = copy_bandwidth(device, sizes["copy_mib"])
    decode = speed["decode"]
    batch1 = decode[sizes["batches"][0]]
    return {"model": config.name, "params_m": round(config.num_params / 1e6, 1), "dtype": str(dtype),
            "weight_gib": round(weight_bytes / 2**30, 3), "context_tokens": sizes["context"],
            "decode_step": speed["decode_step"],
            "decode_tokens_per_s": {str(b): round(v, 1) for b, v in decode.items()},
            "decode_eager_batch1_tokens_per_s": round(speed["decode_eager_batch1"], 1),
            "prefill_tokens": sizes["prefill"], "prefill_tokens_per_s": round(speed["prefill"], 1),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "batch1_ms_per_step": round(1000 / batch1, 3),
            "batch1_fraction_of_bandwidth_limit": round(weight_bytes * batch1 / bandwidth, 4),
            "batch1_eager_fraction_of_bandwidth_limit": round(weight_bytes * speed["decode_eager_batch1"] / bandwidth,
                                                              4)}


def section_tests(ctx: dict) -> dict:
    """The tests that need a GPU (marked `gpu`), and the paged attention kernel's, compiled for this device."""
    if ctx["device"].type != "cuda":
        return {"skipped": "not a CUDA device"}
    files = ["tests/model/kernels/test_triton_decode.py", "tests/server/worker/test_decode_graphs.py", "tests/model/test_cuda.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    print(done.stdout[-5000:], done.stderr[-2000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"the GPU tests exited with {done.returncode}")
    return {"passed": done.stdout.strip().splitlines()[-1]}


def tokenizer():
    from model.text.tokenizer import Tokenizer
    return Tokenizer.from_tiktoken_file(llama3_tokenizer_path())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summary_lines(r: dict, quick: bool) -> list[str]:
    """The figures that matter, one line each, set against TARGETS (which are for an H200, not --quick)."""
    lines = []
    if "device" in r:
        d = r["device"]
        lines.append(f"device: {d.get('name', d['device'])} (capability {d.get('capability', '-')}), "
                     f"torch {d['torch']}, CUDA {d['cuda']}")
    if "sdpa" in r:
        k = r["sdpa"]["model_kernels"]
        generic = "aten::scaled_dot_product_attention"  # the dispatcher; the others are what it chose
        lines.append(f"SDPA in the model: decode -> {[n for n in k['decode'] if n != generic]}; "
                     f"prefill -> {[n for n in k['prefill'] if n != generic]}")
    if "tests" in r:
        lines.append(f"GPU tests: {r['tests'].get('passed') or r['tests'].get('skipped')}")
    if "parity" in r:
        p = r["parity"]
        lines.append(f"parity bf16 vs CPU float32: greedy tokens agree for {p['greedy_steps_agreeing']}/{p['steps']} "
                     f"steps, max |logit error| {p['max_abs_logit_error']:.3g} (logit std {p['logit_std']:.3g}), "
                     f"{verdict(p['passed'])}")
    target = "" if quick else " (target"
    if "throughput" in r:
        t = r["throughput"]
        decode = ", ".join(f"batch {b}: {v:,.0f}" for b, v in t["decode_tokens_per_s"].items())
        lines.append(f"decode tokens/s ({t['model']}, {t['params_m']}M params, {t['weight_gib']} GiB, "
                     f"{t['decode_step']}): {decode}; eager batch 1: {t['decode_eager_batch1_tokens_per_s']:,.0f}")
        fraction = t["batch1_fraction_of_bandwidth_limit"]
        lines.append(f"batch 1 reads weights at {fraction:.1%} of the {t['copy_bandwidth_gb_s']:,} GB/s measured copy "
                     f"bandwidth ({t['batch1_ms_per_step']} ms a step; eager "
                     f"{t['batch1_eager_fraction_of_bandwidth_limit']:.1%})"
                     + ("" if quick else f"{target} >= {TARGETS['batch1_fraction']:.0%}: "
                        f"{verdict(fraction >= TARGETS['batch1_fraction'])})"))
        lines.append(f"prefill {t['prefill_tokens']} tokens: {t['prefill_tokens_per_s']:,.0f} tokens/s")
    if "speculation" in r:
        v, e = r["speculation"]["verify"], r["speculation"]["engine"]
        x = v["verify_rows_exact"]
        lines.append(f"speculation ({v['decode_step']}): {v['k'] + 1} verify rows of one sequence vs one call each: "
                     f"max |logit diff| {x['max_abs_logit_difference']:.3g}, argmax equal {x['argmax_equal']}; decode "
                     f"step {v['decode_step_ms']} ms, verify step {v['verify_step_ms']} ms "
                     f"({v['verify_over_decode']}x), {v['draft_params_m']}M draft step {v['draft_step_ms']} ms: gains "
                     f"above {v['break_even_accepted_per_draft']} accepted of {v['k']}")
        lines.append(f"speculation in the engine (draft = target, prepared steps {e['prepared_steps']}): outputs equal "
                     f"{e['outputs_equal']}, accepted {e['accepted_tokens']}/{e['draft_tokens']}")
    if "transformers" in r:
        h = r["transformers"]
        lines.append(f"transformers {h['transformers']} generate_batch: {h['requests']} requests, "
                     f"{h['output_token_throughput']:,.1f} output tok/s")
    levels = r.get("server", {}).get("levels", {})
    for level, figures in levels.items():
        lines.append(f"server, concurrency {level}: {figures['output_token_throughput']:,.1f} output tok/s, TTFT p50 "
                     f"{figures['ttft_p50_ms'] or 0:,.1f} ms, TPOT p50 {figures['tpot_p50_ms'] or 0:,.1f} ms, "
                     f"{figures['failed']} failed")
    if levels and not quick:
        top = levels[max(levels)]
        if "transformers" in r:
            ratio = top["output_token_throughput"] / r["transformers"]["output_token_throughput"]
            lines.append(f"server at concurrency {max(levels)} / transformers generate_batch: {ratio:.2f}x{target} >= "
                         f"{TARGETS['vs_transformers']:.0f}x: {verdict(ratio >= TARGETS['vs_transformers'])})")
        if 32 in levels:
            ttft = levels[32]["ttft_p50_ms"] or float("inf")
            lines.append(f"TTFT p50 at concurrency 32: {ttft:,.1f} ms{target} < {TARGETS['ttft_p50_ms_at_32']:.0f} ms: "
                         f"{verdict(ttft < TARGETS['ttft_p50_ms_at_32'])})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU dry run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check"))
    parser.add_argument("--budget", type=float, default=500.0, help="seconds the whole pass should take at most")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick for a dry run")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4},
                         name="tiny-llama3") if args.quick else ModelConfig.from_preset("llama-3.2-1b")
    ctx = {"device": device, "dtype": torch.bfloat16, "sizes": QUICK if args.quick else FULL, "out": out,
           "quick": args.quick,
           "bench_config": config, "deadline": time.monotonic() + args.budget}
    # gpu_check.sh's `timeout` sends SIGTERM: unwind, so the server subprocess is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results, failed = {}, []
    sections = (("device", section_device), ("sdpa", section_sdpa), ("tests", section_tests),
                ("parity", section_parity), ("throughput", section_throughput),
                ("speculation", lambda c: section_speculation(c, ModelConfig(**TINY, name="tiny-llama3"),
                                                              random_state, tokenizer())),
                ("transformers", section_transformers), ("server", section_server))
    for name, section in sections:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            results[name] = section(ctx)
            print(json.dumps(results[name], indent=1, default=str), flush=True)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    if "parity" in results and not results["parity"]["passed"]:
        failed.append("parity (tokens disagree beyond near-ties)")
    (out / "gpu_check.json").write_text(json.dumps({"results": results, "failed": failed}, indent=1, default=str))
    print("\n=== summary ===")
    print("\n".join(summary_lines(results, args.quick)))
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all sections passed'}; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
