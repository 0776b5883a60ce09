"""gpu_check.py's speculative-decoding section: verify rows on the device, and what a verify step costs.

1. Exactness on the device: 1 + k rows of one sequence at successive positions in one call of the decode step the
   server runs (CUDA graphs; the Triton kernel writes every row's K/V before any row attends) against one call per
   position: the largest logit difference and whether every row's argmax agrees.
2. Cost, on the Llama 3.2 1B-shaped random model of the throughput section: a decode step of one row, a verify step
   of 1 + k rows, and a draft step of a smaller random model of the same vocabulary (the 1B's first two layers'
   shapes), each through its own CUDA graphs. Acceptance of random drafts means nothing, so the section reports the
   break-even instead: the accepted tokens per draft at which k draft steps and one verify step cost what the
   plain steps that emit the same tokens cost.
3. The engine end to end: a tiny random target drafting for itself through its own and the draft's CUDA graphs:
   greedy outputs equal those without speculation, and the acceptance.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.loading import LoadedModel, build_model

K = 4  # proposals per verify step
BLOCK = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _prepared(model, context: int, device: torch.device, rows: int):
    """A cache with one sequence's context filled, and the device's prepared decode step for up to `rows` rows."""
    from server.worker.decode import prepared_decode_step

    blocks = -(-(context + K + 2) // BLOCK)
    cache = KVCache(model.layer_config, blocks, BLOCK, dtype=model.dtype, device=device)
    table = tuple(range(blocks))
    ids = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    model(ForwardBatch.build([SequenceChunk(0, 0, ids, blocks=table)], device, BLOCK), cache)
    # CUDA graphs on a GPU; a CPU dry run stays eager rather than compile for minutes
    step = prepared_decode_step(model, cache, rows, blocks * BLOCK, device) if device.type == "cuda" else None
    return cache, table, step


def _rows(model, cache, step, token_ids, positions, tables, device):
    from server.worker.decode import decode_rows

    return decode_rows(model, cache, step, list(zip(token_ids, positions, tables)), device).clone()


def verify_costs(model, config: ModelConfig, device: torch.device, dtype: torch.dtype, context: int,
                 repeats: int, random_state) -> dict:
    cache, table, step = _prepared(model, context, device, K + 1)
    tokens = [11, 22, 33, 44, 55][:K + 1]
    positions = [context + j for j in range(K + 1)]
    saved = cache.k.clone(), cache.v.clone()
    together = _rows(model, cache, step, tokens, positions, [table] * (K + 1), device)
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    alone = torch.cat([_rows(model, cache, step, [t], [p], [table], device) for t, p in zip(tokens, positions)])
    exact = {"max_abs_logit_difference": float((together.float() - alone.float()).abs().max()),
             "argmax_equal": bool(torch.equal(together.argmax(-1), alone.argmax(-1)))}
    decode = _seconds(lambda: _rows(model, cache, step, tokens[:1], positions[:1], [table], device), device, repeats)
    verify = _seconds(lambda: _rows(model, cache, step, tokens, positions, [table] * (K + 1), device), device,
                      repeats)
    mode = "CUDA graphs" if step is not None else "eager"
    cache = step = None  # the graphs and the cache go before the draft's come
    draft_config = dataclasses.replace(config, num_hidden_layers=2, name=f"{config.name}-2-layer-draft")
    draft = build_model(draft_config, random_state(draft_config, device, dtype, seed=5).items(), device=device,
                        dtype=dtype)
    draft_cache, draft_table, draft_step = _prepared(draft, context, device, 1)
    drafting = _seconds(lambda: _rows(draft, draft_cache, draft_step, tokens[:1], positions[:1], [draft_table],
                                      device), device, repeats)
    # k draft steps + one verify step emit (accepted + 1) tokens, which plain decoding emits in as many steps
    break_even = (K * drafting + verify) / decode - 1
    return {"k": K, "context": context, "decode_step": mode,
            "verify_rows_exact": exact, "decode_step_ms": round(decode * 1e3, 3),
            "verify_step_ms": round(verify * 1e3, 3), "verify_over_decode": round(verify / decode, 3),
            "draft_model": draft_config.name, "draft_params_m": round(draft_config.num_params / 1e6, 1),
            "draft_step_ms": round(drafting * 1e3, 3),
            "break_even_accepted_per_draft": round(break_even, 2),
            "note": f"speculation gains when more than break_even of the {K} proposals are accepted on average"}


def engine_end_to_end(tiny: ModelConfig, device: torch.device, dtype: torch.dtype, random_state,
                      tokenizer) -> dict:
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.sampling_params import SamplingParams
    from server.engine.speculation import SpeculationBudget

    def loaded() -> LoadedModel:
        model = build_model(tiny, random_state(tiny, device, dtype, seed=3).items(), device=device, dtype=dtype)
        return LoadedModel(model, tokenizer, tiny, "tiny-random", 0.0)

    target = loaded()
    settings = dict(device=str(device), dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
                    max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, enforce_eager=device.type != "cuda")
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = {f"r{i}": tokenizer.encode(f"Story {i}:" + " and" * i) for i in range(4)}

    def run(engine) -> dict:
        for rid, ids in prompts.items():
            engine.add_request(rid, ids, params)
        tokens: dict = {rid: [] for rid in prompts}
        while engine.has_work():
            for out in engine.step():
                for delta in out.deltas:
                    tokens[out.request_id] += delta.token_ids
        return tokens

    plain = run(LLMEngine(target, EngineConfig(**settings)))
    spec = '{"method": "draft_model", "model": "tiny-random", "num_speculative_tokens": 4}'
    engine = LLMEngine(target, EngineConfig(speculative_config=spec, **settings), draft=loaded())
    measured = engine.scheduler.budget
    # A draft as costly as its target never pays, so the measured budget would propose nothing: proposals up to
    # max_rows every step (the unmeasured budget), to run the path.
    engine.scheduler.budget = SpeculationBudget(engine.scheduler.speculation)
    got = run(engine)
    stats = engine.stats()
    return {"outputs_equal": got == plain, "draft_tokens": stats.spec_draft_tokens_total,
            "accepted_tokens": stats.spec_accepted_tokens_total,
            "prepared_steps": [engine.runner.decode_step is not None, engine.runner.draft.decode_step is not None],
            "measured_step_ms_by_rows": [round(t * 1e3, 3) for t in measured.step_seconds],
            "measured_draft_step_ms_by_rows": [round(t * 1e3, 3) for t in measured.draft_seconds]}


def section_speculation(ctx: dict, tiny: ModelConfig, random_state, tokenizer) -> dict:
    device, dtype, sizes = ctx["device"], ctx["dtype"], ctx["sizes"]
    config = ctx["bench_config"]
    model = ctx.get("bench_model")
    if model is None:
        model = build_model(config, random_state(config, device, dtype, seed=2).items(), device=device, dtype=dtype)
    result = {"verify": verify_costs(model, config, device, dtype, sizes["context"], sizes["steps"], random_state)}
    result["engine"] = engine_end_to_end(tiny, device, dtype, random_state, tokenizer)
    # Reported, not raised: cuBLAS may round a row differently at another batch size, so a near tie of a random
    # model can flip without anything being wrong; a kernel reading stale K/V shows as large differences.
    return result
