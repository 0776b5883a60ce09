"""Structured outputs: grammar compile times, and what constrained decoding costs in throughput.

    python bench/structured_bench.py [--concurrency 1 16] [--output-len 128]

Compile times (cold, then cached) for a request with 20 tools and for a large JSON schema. Then the engine in the
default configuration, at each concurrency level, random prompts unconstrained and constrained to a JSON array of at
least 1,000 integers (so both run the full `--output-len` tokens): output tokens/s of each and the ratio. Constrained
and unconstrained runs alternate, twice, each on fresh prompts (no prefix cache hits).
"""

from __future__ import annotations

import argparse
import random
import time

from model.paths import use_persistent_compile_cache

use_persistent_compile_cache()  # before anything imports Inductor, which points the cache at /tmp

from model.loading import load  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.grammar import GrammarCompiler  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.openai.constraints import json_schema_spec  # noqa: E402
from server.openai.tool_calls import tool_spec  # noqa: E402


def twenty_tools() -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i}",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 100}, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
            "mode": {"enum": ["fast", "exact", "fuzzy"]},
            "filters": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "value": {"anyOf": [{"type": "string"}, {"type": "number"}]}},
                "required": ["field", "value"]}, "maxItems": 5}},
            "required": ["query"]}}} for i in range(20)]


def large_schema() -> dict:
    """An object of 60 typed properties, a third of them nested objects of their own."""
    properties = {}
    for i in range(60):
        if i % 3 == 0:
            properties[f"group_{i}"] = {"type": "object", "properties": {
                "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"}, "size": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 1, "maxItems": 4}},
                "required": ["name", "size"]}
        elif i % 3 == 1:
            properties[f"value_{i}"] = {"type": "number", "minimum": -1000, "maximum": 1000}
        else:
            properties[f"flag_{i}"] = {"anyOf": [{"type": "boolean"}, {"type": "null"}]}
    return {"type": "object", "properties": properties, "required": list(properties)[:30]}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(rng: random.Random, count: int, length: int) -> list[list[int]]:
    return [[rng.randrange(1000, 20000) for _ in range(length)] for _ in range(count)]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, tag: str) -> float:
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    generated = 0
    while engine.has_work():
        for out in engine.step():
            generated += sum(len(d.token_ids) for d in out.deltas)
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()

    config = EngineConfig(max_num_seqs=max(args.concurrency), max_model_len=args.prompt_len + args.output_len + 1)
    loaded = load(config.model, dtype=config.torch_dtype, max_seq_len=config.max_model_len,
                  quantization=config.quantization)
    setup = time.perf_counter()
    compiler = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)
    print(f"grammar engine set up for the vocabulary ({loaded.config.vocab_size} tokens) in "
          f"{time.perf_counter() - setup:.2f} s")
    tools_spec, _ = tool_spec(twenty_tools(), "auto", True)
    schema_spec = json_schema_spec(large_schema(), "response_format")
    for name, spec in (("20 tools, tool_choice auto", tools_spec), ("large schema (60 properties)", schema_spec)):
        cold = timed(lambda: compiler.compile(spec))
        cached = timed(lambda: compiler.compile(spec))
        print(f"compile {name}: {cold * 1e3:.1f} ms cold, {cached * 1e3:.3f} ms cached")

    engine = LLMEngine(loaded, config)
    engine.runner.wait_compiled()  # timed on the compiled step, not beside its compiler
    grammar = compiler.compile(json_schema_spec({"type": "array", "items": {"type": "integer"}, "minItems": 1000},
                                                "bench"))
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.output_len, grammar=grammar)
    rng = random.Random(0)
    run(engine, [[rng.randrange(1000, 20000) for _ in range(16)]], plain, "warm")
    print(f"{'concurrency':>11} {'round':>5} {'plain tok/s':>12} {'constrained tok/s':>18} {'ratio':>6}")
    for c in args.concurrency:
        for r in (1, 2):
            a = run(engine, fresh(rng, c, args.prompt_len), plain, f"p{c}-{r}")
            b = run(engine, fresh(rng, c, args.prompt_len), constrained, f"c{c}-{r}")
            print(f"{c:>11} {r:>5} {a:>12.1f} {b:>18.1f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
