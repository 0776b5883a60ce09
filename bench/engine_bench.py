"""Engine throughput with continuous batching: aggregate output tokens/s at several concurrency levels.

    python bench/engine_bench.py [--model PATH] [--concurrency 1 4 16 32] [--prompt-len 128] [--output-len 128]
                                 [--quantization auto|none|int4|int8] [--enforce-eager] [--max-model-len N]

For each level, `concurrency` requests of `--prompt-len` random tokens each generate exactly `--output-len`
tokens (ignore_eos) through one `LLMEngine`; throughput is output tokens over wall time, prefill included.
All levels run in one process, one after another, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import random
import time

from model.loading import load
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams


def run_level(engine: LLMEngine, concurrency: int, prompt_len: int, output_len: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i in range(concurrency):
        engine.add_request(f"{concurrency}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params)
    first_token = None
    generated = 0
    while engine.has_work():
        for out in engine.step():
            generated += sum(len(d.token_ids) for d in out.deltas)
            if first_token is None and generated:
                first_token = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    assert generated == concurrency * output_len, (generated, concurrency * output_len)
    return generated / elapsed, first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"])
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="tokens per sequence (default: prompt + output + 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                          enforce_eager=args.enforce_eager, max_num_seqs=max(args.concurrency),
                          max_model_len=args.max_model_len or args.prompt_len + args.output_len + 1,
                          max_num_batched_tokens=max(args.max_num_batched_tokens, max(args.concurrency)))
    loaded = load(config.model, device=config.device, dtype=config.torch_dtype, max_seq_len=config.max_model_len,
                  quantization=config.quantization)
    engine = LLMEngine(loaded, config)
    engine.runner.wait_compiled()  # timed on the compiled step, not beside its compiler
    print(f"{loaded.source} ({config.torch_dtype}, quantization {loaded.quantization}, "
          f"{'eager' if engine.runner.decode_step is None else 'compiled decode'}), "
          f"prompt {args.prompt_len}, output {args.output_len} tokens")
    run_level(engine, 1, 16, 4, args.seed)  # warm-up
    rates = {}
    print(f"{'concurrency':>11} {'output tok/s':>13} {'first token s':>14}")
    for c in args.concurrency:
        rate, ttft = run_level(engine, c, args.prompt_len, args.output_len, args.seed)
        rates[c] = rate
        print(f"{c:>11} {rate:>13.1f} {ttft:>14.2f}")
    base = rates.get(1)
    if base:
        for c in args.concurrency:
            if c != 1:
                print(f"throughput ratio {c}-concurrent / single: {rates[c] / base:.2f}x")


if __name__ == "__main__":
    main()
