"""The paged KV cache on the default model: memory pressure changes no output.

Each test runs requests together under a cache far too small for all of them, so sequences are preempted,
recomputed and resumed, and checks every output against the same request run alone with ample memory.
"""

from __future__ import annotations

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from server.engine.sampling_params import SamplingParams
from tests.server.engine.helpers import GREEDY, assert_all_slots_free, collect, make_engine, prompts, run

BLOCK = 16


def tight_engine(loaded, blocks: int, **overrides):
    per_block = KVCache.bytes_per_token(loaded.config, loaded.model.dtype) * BLOCK
    return make_engine(loaded, kv_cache_memory=blocks * per_block, block_size=BLOCK, **overrides)


def alone(loaded, ids, params):
    return run(make_engine(loaded), {"x": (ids, params)})


def test_greedy_outputs_under_memory_pressure_equal_outputs_alone(smollm):
    """Eight requests, one with n=2 and one asking for prompt logprobs, sharing a prefix, in a cache of 10 blocks
    (160 tokens; together they need about 500): preemptions happen and no output changes."""
    tok = smollm.tokenizer
    shared = tok.encode("You are a careful assistant. Answer briefly and precisely, in plain English. ")
    requests = {f"r{i}": (shared + p, GREEDY) for i, p in enumerate(prompts(tok, 6))}
    requests["n2"] = (shared + tok.encode("Name two colours:"), SamplingParams(temperature=0.0, max_tokens=24,
                                                                               n=2, ignore_eos=True))
    requests["lp"] = (tok.encode("The capital of France is"), SamplingParams(temperature=0.0, max_tokens=24,
                                                                          prompt_logprobs=2, ignore_eos=True))
    engine = tight_engine(smollm, blocks=10)
    assert engine.max_model_len == 160
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    lp_seq = engine.requests["lp"].seqs[0]
    results: dict = {}
    while engine.has_work():
        collect(engine.step(), results)
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the test is meant to preempt"
    assert stats.prefix_cache_hit_tokens > 0
    for rid, (ids, params) in requests.items():
        expected = alone(smollm, ids, params)
        for index in range(params.n):
            assert results[(rid, index)].token_ids == expected[("x", index)].token_ids, (rid, index)
            assert results[(rid, index)].error is None
    reference = make_engine(smollm)
    reference.add_request("lp", *requests["lp"])
    ref_seq = reference.requests["lp"].seqs[0]
    while reference.has_work():
        reference.step()
    assert [e and (e.token_id, round(e.logprob, 4)) for e in lp_seq.prompt_logprobs] == \
        [e and (e.token_id, round(e.logprob, 4)) for e in ref_seq.prompt_logprobs]
    assert_all_slots_free(engine)


def test_aborts_under_memory_pressure_free_their_blocks_and_change_nothing(smollm):
    tok = smollm.tokenizer
    ids = prompts(tok, 4)
    engine = tight_engine(smollm, blocks=5)
    for i, p in enumerate(ids):
        engine.add_request(f"r{i}", p, GREEDY)
    results: dict = {}
    for _ in range(12):
        collect(engine.step(), results)
    engine.abort("r1")
    engine.abort("r3")
    while engine.has_work():
        collect(engine.step(), results)
    for i in (0, 2):
        assert results[(f"r{i}", 0)].token_ids == alone(smollm, ids[i], GREEDY)[("x", 0)].token_ids
    assert engine.stats().num_preemptions > 0
    assert_all_slots_free(engine)


def test_a_request_longer_than_the_whole_cache_is_refused_up_front(smollm):
    engine = tight_engine(smollm, blocks=4)  # 64 tokens: max_model_len is lowered to what the cache holds
    assert engine.max_model_len == 64
    from server.engine.exceptions import PromptTooLong
    with pytest.raises(PromptTooLong, match="maximum context length is 64"):
        engine.add_request("long", list(range(1, 80)), GREEDY)
    out = run(engine, {"ok": (list(range(1, 40)), SamplingParams(temperature=0.0, max_tokens=100))})
    assert len(out[("ok", 0)].token_ids) <= 64 - 39  # capped by the cache, like the context


def test_decode_through_scattered_blocks_equals_one_contiguous_slot(smollm):
    """The same sequence, its K/V in one slot or in shuffled blocks of 16: the decode logits are the same bits
    (the kernel reads 16 keys at a time, never across a block), prefill logits equal within rounding."""
    model = smollm.model
    dtype = model.dtype
    ids = smollm.tokenizer.encode("A paged cache keeps each sequence in blocks scattered over one pool, " * 3)
    n = len(ids)
    slot_cache = KVCache(model.config, 1, 256, dtype=dtype)
    paged = KVCache(model.config, 32, BLOCK, dtype=dtype)
    table = tuple(torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist())
    prefill_slot = model(ForwardBatch.build([SequenceChunk(0, 0, ids[:-4], all_logits=True)]), slot_cache)
    prefill_paged = model(ForwardBatch.build([SequenceChunk(0, 0, ids[:-4], all_logits=True, blocks=table)],
                                             block_size=BLOCK), paged)
    torch.testing.assert_close(prefill_paged, prefill_slot, atol=1e-4, rtol=1e-4)
    for position in range(n - 4, n):
        one = model(ForwardBatch.build([SequenceChunk(0, position, [ids[position]], decode=True)]), slot_cache)
        many = model(ForwardBatch.build([SequenceChunk(0, position, [ids[position]], decode=True, blocks=table)],
                                        block_size=BLOCK), paged)
        assert torch.equal(one, many), position
