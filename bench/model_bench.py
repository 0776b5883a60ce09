"""Forward-pass throughput of the model alone: prefill tokens/s and decode tokens/s at several batch sizes.

    python bench/model_bench.py [--model PATH] [--dtypes float32 bfloat16] [--batches 1 8 32]

Decode steps run over a KV cache filled to `--context` tokens per sequence, as in serving. Each figure is
the median of `--repeats` timed runs; dtypes are measured side by side in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file, a model directory or a Hub repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128, help="cached tokens per sequence during decode")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        loaded = load(args.model, device=args.device, dtype=dtype)
        model, vocab = loaded.model, loaded.config.vocab_size
        print(f"{loaded.source}: {loaded.config.num_params / 1e6:.0f}M parameters, loaded in "
              f"{loaded.load_seconds:.2f} s ({dtype_name})")
        max_len = max(args.prompt_len, args.context + args.steps) + 1
        cache = KVCache(loaded.config, max(args.batches), max_len, dtype=dtype, device=args.device)
        gen = torch.Generator().manual_seed(0)

        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        prefill = ForwardBatch.build([SequenceChunk(0, 0, prompt)], args.device)
        seconds = timed(lambda: model(prefill, cache), args.repeats)
        rows.append((dtype_name, f"prefill {args.prompt_len}", args.prompt_len / seconds))

        for batch in args.batches:
            context = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
            model(ForwardBatch.build([SequenceChunk(s, 0, context) for s in range(batch)], args.device), cache)
            steps = [ForwardBatch.build([SequenceChunk(s, args.context + i, [7]) for s in range(batch)], args.device)
                     for i in range(args.steps)]

            def decode():
                for step in steps:
                    model(step, cache)

            seconds = timed(decode, args.repeats)
            rows.append((dtype_name, f"decode batch {batch}", batch * args.steps / seconds))

    print(f"\n{'dtype':<10} {'workload':<18} {'tokens/s':>10}")
    for dtype_name, workload, rate in rows:
        print(f"{dtype_name:<10} {workload:<18} {rate:>10.1f}")


if __name__ == "__main__":
    main()
