"""The engine: continuous batching, chunked prefill, stopping, limits and failure isolation."""

from __future__ import annotations

import random

import pytest

from server.engine.exceptions import EngineOverloaded, ParamError, PromptTooLong
from server.engine.sampling_params import SamplingParams
from tests.server.engine.helpers import GREEDY, assert_all_slots_free, collect, make_engine, prompts, run


@pytest.mark.slow
def test_greedy_batch_invariance_16_concurrent(smollm):
    ids = prompts(smollm.tokenizer, 16)
    together = run(make_engine(smollm), {str(i): (p, GREEDY) for i, p in enumerate(ids)})
    for i, p in enumerate(ids):
        alone = run(make_engine(smollm, max_num_seqs=1, max_num_batched_tokens=64), {"x": (p, GREEDY)})
        assert together[(str(i), 0)].token_ids == alone[("x", 0)].token_ids, f"prompt {i} differs in a batch"
        assert len(alone[("x", 0)].token_ids) == 24


def test_request_admitted_mid_decode_does_not_change_others(smollm):
    ids = prompts(smollm.tokenizer, 4)
    engine = make_engine(smollm, max_num_batched_tokens=32)
    results: dict = {}
    engine.add_request("a", ids[0], GREEDY)
    engine.add_request("b", ids[1], GREEDY)
    for _ in range(5):
        collect(engine.step(), results)
    engine.add_request("c", ids[2], GREEDY)  # joins while a and b decode
    collect(engine.step(), results)
    engine.add_request("d", ids[3], GREEDY)
    while engine.has_work():
        collect(engine.step(), results)
    for name, p in zip("abcd", ids):
        alone = run(make_engine(smollm, max_num_seqs=1), {"x": (p, GREEDY)})
        assert results[(name, 0)].token_ids == alone[("x", 0)].token_ids


def test_long_prompt_is_chunked_while_short_requests_keep_decoding(tiny_llama3):
    engine = make_engine(tiny_llama3, max_model_len=1024, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    results: dict = {}
    engine.add_request("s1", [1000, 2000, 3000], params)
    engine.add_request("s2", [4000, 5000], params)
    collect(engine.step(), results)
    long_prompt = list(range(10, 610))  # 600 tokens: ten steps' worth at this budget
    engine.add_request("long", long_prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    long_seq = engine.requests["long"].seqs[0]
    prefill_steps = 0
    while long_seq.num_computed < len(long_prompt):
        before = {k: len(r.token_ids) for k, r in results.items()}
        collect(engine.step(), results)
        prefill_steps += 1
        # each short request got exactly one more token in every step of the long prefill
        assert len(results[("s1", 0)].token_ids) == before[("s1", 0)] + 1
        assert len(results[("s2", 0)].token_ids) == before[("s2", 0)] + 1
        if long_seq.num_computed < len(long_prompt):  # the step that completes the prefill samples its first token
            assert ("long", 0) not in results
    assert prefill_steps >= 600 // 64
    while engine.has_work():
        collect(engine.step(), results)
    assert len(results[("long", 0)].token_ids) == 4
    alone = run(make_engine(tiny_llama3, max_model_len=1024), {"x": (long_prompt, SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True))})
    assert results[("long", 0)].token_ids == alone[("x", 0)].token_ids


def test_200_random_requests_all_complete_and_free_their_slots(tiny_llama3):
    rng = random.Random(0)
    engine = make_engine(tiny_llama3, max_num_seqs=16, max_num_batched_tokens=128, max_waiting=1000)
    expected, results = {}, {}
    pending = []
    for i in range(200):
        prompt = [rng.randrange(128_000) for _ in range(rng.randint(1, 80))]
        params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 24),
                                ignore_eos=True, seed=i)
        pending.append((str(i), prompt, params))
        expected[str(i)] = params.max_tokens
    while pending or engine.has_work():
        for _ in range(min(10, len(pending))):  # ten arrivals a step: faster than they can finish
            engine.add_request(*pending.pop(0))
        collect(engine.step(), results)
    assert {rid: len(results[(rid, 0)].token_ids) for rid in expected} == expected
    assert all(results[(rid, 0)].finish_reason == "length" for rid in expected)
    assert_all_slots_free(engine)
    assert engine.stats().generation_tokens_total == sum(expected.values())


def test_stop_string_across_token_boundary(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("The alphabet begins: A B C D E F G")
    free = run(make_engine(smollm), {"r": (prompt, GREEDY)})[("r", 0)]
    # A stop string made of the tail of one token and the head of the next.
    pieces = [tok.decode([t]) for t in free.token_ids]
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-1] + pieces[k + 1][:2]
    cut = free.text.find(stop)
    assert 0 <= cut
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop, "NEVER-SEEN"])
    got = run(make_engine(smollm), {"r": (prompt, params)})[("r", 0)]
    assert got.text == free.text[:cut]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=True)
    got = run(make_engine(smollm), {"r": (prompt, params)})[("r", 0)]
    assert got.text == free.text[:cut + len(stop)]


def test_stop_token_ids_eos_and_max_tokens(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("Count: one, two, three,")
    free = run(make_engine(smollm), {"r": (prompt, GREEDY)})[("r", 0)]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    got = run(make_engine(smollm), {"r": (prompt, params)})[("r", 0)]
    assert got.token_ids == free.token_ids[:first + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_id)
    assert got.text == tok.decode(free.token_ids[:first], skip_special_tokens=True)

    got = run(make_engine(smollm), {"r": (prompt, SamplingParams(temperature=0.0, max_tokens=7))})[("r", 0)]
    assert (len(got.token_ids), got.finish_reason) == (7, "length")

    # min_tokens keeps the stop token from ending the sequence before it is reached
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id], min_tokens=first + 3)
    got = run(make_engine(smollm), {"r": (prompt, params)})[("r", 0)]
    assert len(got.token_ids) >= first + 3 and stop_id not in got.token_ids[:first + 2]


def test_chat_ends_on_eos(smollm):
    tok = smollm.tokenizer
    from model.text.chat_template import render_chat
    text = render_chat(tok.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                       bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=True)
    got = run(make_engine(smollm), {"r": (tok.encode_prompt(text), SamplingParams(temperature=0.0, max_tokens=64))})
    result = got[("r", 0)]
    assert result.finish_reason == "stop" and result.stop_reason is None
    assert result.token_ids[-1] in tok.eos_token_ids
    assert "Paris" in result.text and "<|im_end|>" not in result.text


def test_context_limit_caps_max_tokens(tiny_llama3):
    engine = make_engine(tiny_llama3, max_model_len=64)
    got = run(engine, {"r": (list(range(1, 61)), SamplingParams(max_tokens=100, ignore_eos=True))})[("r", 0)]
    assert (len(got.token_ids), got.finish_reason) == (4, "length")
    with pytest.raises(PromptTooLong, match="maximum context length is 64"):
        engine.add_request("long", list(range(1, 65)), SamplingParams())
    with pytest.raises(ParamError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ParamError, match="token ids"):
        engine.add_request("bad", [1, 10**9], SamplingParams())
    assert_all_slots_free(engine)


def test_seeded_sampling_is_reproducible_in_any_batch(smollm):
    ids = prompts(smollm.tokenizer, 6)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = run(make_engine(smollm), {"s": (ids[0], seeded)})[("s", 0)].token_ids
    others = {str(i): (p, SamplingParams(temperature=0.9, max_tokens=16, ignore_eos=True, seed=i if i % 2 else None))
              for i, p in enumerate(ids[1:])}
    mixed = run(make_engine(smollm), {"s": (ids[0], seeded), **others})[("s", 0)].token_ids
    assert mixed == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99, ignore_eos=True)
    assert run(make_engine(smollm), {"s": (ids[0], other_seed)})[("s", 0)].token_ids != alone


def test_the_server_seed_makes_unseeded_requests_reproducible(tiny_llama3):
    """Requests that give no seed draw from the sampler's generator, seeded by --seed: the same requests, one after
    another, sample the same tokens on two engines of one seed, and other tokens on an engine of another."""
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    requests = [[17, 2000 + i, 3000 + 2 * i] for i in range(3)]

    def outputs(seed: int) -> list[list[int]]:
        engine = make_engine(tiny_llama3, seed=seed)
        return [run(engine, {f"r{i}": (ids, unseeded)})[(f"r{i}", 0)].token_ids for i, ids in enumerate(requests)]

    first = outputs(7)
    assert outputs(7) == first
    assert outputs(8) != first
    assert len({tuple(ids) for ids in first}) == len(first)  # the generator moves on from request to request


def test_n_samples_share_the_prompt_and_differ(smollm):
    ids = prompts(smollm.tokenizer, 1)[0]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    engine = make_engine(smollm)
    got = run(engine, {"r": (ids, params)})
    samples = [got[("r", i)].token_ids for i in range(4)]
    assert all(len(s) == 12 for s in samples) and len({tuple(s) for s in samples}) > 1
    # sample i equals a single sample seeded with seed + i, computed without any prompt sharing
    for i in (0, 3):
        single = SamplingParams(temperature=1.0, max_tokens=12, seed=7 + i, ignore_eos=True)
        assert run(make_engine(smollm), {"x": (ids, single)})[("x", 0)].token_ids == samples[i]
    assert_all_slots_free(engine)


def test_queue_overflow_is_refused_cleanly(tiny_llama3):
    engine = make_engine(tiny_llama3, max_num_seqs=2, max_num_batched_tokens=8, max_waiting=3)
    for i in range(3):
        engine.add_request(str(i), [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(EngineOverloaded):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(EngineOverloaded):  # n counts: two more sequences do not fit either
        engine.add_request("y", [1], SamplingParams(n=2))
    results = run(engine, {})
    assert sorted(k[0] for k in results) == ["0", "1", "2"]
    assert_all_slots_free(engine)


def test_failure_in_one_request_leaves_others_intact(smollm):
    ids = prompts(smollm.tokenizer, 3)
    expected = run(make_engine(smollm), {str(i): (p, GREEDY) for i, p in enumerate(ids)})
    engine = make_engine(smollm)
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, GREEDY)
    processor = engine.requests["1"].processors[0]
    calls = {"n": 0}
    original = processor.append

    def failing_append(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return original(*args)

    processor.append = failing_append
    results: dict = {}
    while engine.has_work():
        collect(engine.step(), results)
    assert isinstance(results[("1", 0)].error, RuntimeError)
    for rid in ("0", "2"):
        assert results[(rid, 0)].token_ids == expected[(rid, 0)].token_ids
    assert_all_slots_free(engine)


def test_abort_frees_the_slot_within_a_step(tiny_llama3):
    engine = make_engine(tiny_llama3, max_num_seqs=4)
    for i in range(4):
        engine.add_request(str(i), [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().slots_used == 4
    final = engine.abort("2")
    assert final.finished and engine.stats().slots_used == 3
    assert engine.abort("2") is None  # twice is harmless
    results = run(engine, {})
    assert ("2", 0) not in results and all(len(results[(r, 0)].token_ids) == 49 for r in "013")
    assert_all_slots_free(engine)


def test_prefix_reuse_prefills_only_the_new_suffix_and_changes_nothing(smollm):
    tok = smollm.tokenizer
    shared = tok.encode("You are a careful assistant. Answer briefly and precisely, in plain English, "
                        "without lists or markdown. Question:")
    first = shared + tok.encode(" What colour is the sky?")
    second = shared + tok.encode(" Name a large ocean.")
    assert len(shared) >= 16

    engine = make_engine(smollm)
    run(engine, {"a": (first, GREEDY)})
    before = engine.stats()
    got = run(engine, {"b": (second, GREEDY)})[("b", 0)]
    after = engine.stats()
    reused = len(shared) // after.block_size * after.block_size  # the full blocks of the shared prefix
    assert reused >= 16
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == reused
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(second) - reused

    fresh = run(make_engine(smollm, enable_prefix_caching=False), {"b": (second, GREEDY)})[("b", 0)]
    assert got.token_ids == fresh.token_ids
    assert_all_slots_free(engine)


def test_prefix_reuse_skips_requests_that_want_prompt_logprobs(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("The quick brown fox jumps over the lazy dog while the cat watches from the fence.")
    engine = make_engine(smollm)
    run(engine, {"a": (prompt, GREEDY)})
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    engine.add_request("b", prompt, params)
    seq = engine.requests["b"].seqs[0]
    while engine.has_work():
        engine.step()
    assert engine.stats().prefix_cache_hit_tokens == 0
    assert len(seq.prompt_logprobs) == len(prompt) and seq.prompt_logprobs[0] is None
