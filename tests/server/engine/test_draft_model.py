"""Speculative decoding with a draft model (server/worker/draft.py): outputs are the ones without speculation,
token for token and logprob for logprob, whatever the draft proposes; the target as its own draft has nearly every
proposal accepted, a random draft nearly none; a draft with another vocabulary is refused."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import LoadedModel, load
from model.paths import default_gguf_path
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.model.checkpoint.test_loading import LAYOUTS, write_checkpoint
from tests.server.engine.helpers import always_propose, assert_all_slots_free, collect, make_engine, run
from tests.server.engine.test_speculation import TEXTS

TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # K and V x 2 layers x 2 KV heads x 8 dims x float32


def draft_config(model, k: int = 4, **extra) -> str:
    return json.dumps({"method": "draft_model", "model": str(model), "num_speculative_tokens": k, **extra})


@pytest.fixture(scope="module")
def smollm_bf16():
    return load(None, dtype=torch.bfloat16, quantization="auto")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two random tiny Llama 3 checkpoints of the same shapes and vocabulary, different weights: target and draft."""
    target, draft = tmp_path_factory.mktemp("tiny-target"), tmp_path_factory.mktemp("tiny-draft")
    write_checkpoint(target, LAYOUTS["single-untied"], seed=0)
    write_checkpoint(draft, LAYOUTS["single-untied"], seed=1)
    return target, draft


def assert_same_outputs(got: dict, expected: dict, requests, tolerance: float = 0.0) -> None:
    """The same tokens and finish; logprobs bitwise equal (the same rows), or within `tolerance` where preemption
    recomputed a prompt in other chunks than the first time."""
    for rid in requests:
        assert got[(rid, 0)].error is None, rid
        assert got[(rid, 0)].token_ids == expected[(rid, 0)].token_ids, rid
        if tolerance == 0.0:
            assert got[(rid, 0)].logprobs == expected[(rid, 0)].logprobs, rid
        for a, b in zip(got[(rid, 0)].logprobs, expected[(rid, 0)].logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= tolerance, rid
        assert (got[(rid, 0)].finish_reason, got[(rid, 0)].stop_reason) == (
            expected[(rid, 0)].finish_reason, expected[(rid, 0)].stop_reason), rid


def test_the_target_as_its_own_draft_has_nearly_every_proposal_accepted_and_changes_nothing(smollm_bf16):
    """The default model (bf16, packed) drafting for itself: its proposals are the target's own greedy choices
    (decode rows computed alike), so at least 98% are accepted; greedy, logprobs, seeded sampled and stop-string
    requests, together and alone, give what plain decoding gives."""
    tok = smollm_bf16.tokenizer
    requests = {f"greedy{i}": (tok.encode(text), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
                for i, text in enumerate(TEXTS)}
    requests["logprobs"] = (tok.encode(TEXTS[1]), SamplingParams(temperature=0.0, max_tokens=30, logprobs=2,
                                                                 ignore_eos=True))
    requests["stop"] = (tok.encode(TEXTS[1]), SamplingParams(temperature=0.0, max_tokens=40, stop=["mul"]))
    requests["sampled"] = (tok.encode(TEXTS[3]), SamplingParams(temperature=0.7, seed=3, max_tokens=30,
                                                                ignore_eos=True, logprobs=1))
    plain = run(make_engine(smollm_bf16), requests)
    engine = always_propose(make_engine(smollm_bf16, speculative_config=draft_config(default_gguf_path(),
                                                                                      max_rows=16)))
    together = run(engine, requests)
    assert_same_outputs(together, plain, requests)
    greedy = [rid for rid in requests if rid != "sampled"]
    alone = {}
    for rid in greedy[:2]:
        alone.update(run(engine, {rid: requests[rid]}))
    assert_same_outputs(alone, plain, greedy[:2])
    proposed = sum(r[(rid, 0)].metrics.num_draft_tokens for r in (together, alone) for rid in greedy if (rid, 0) in r)
    accepted = sum(r[(rid, 0)].metrics.num_accepted_tokens for r in (together, alone) for rid in greedy
                   if (rid, 0) in r)
    assert proposed > 100 and accepted >= 0.98 * proposed, (accepted, proposed)
    assert together[("sampled", 0)].metrics.num_draft_tokens > 0
    assert_all_slots_free(engine)


def test_a_random_draft_is_mostly_rejected_and_changes_nothing(tiny_dirs):
    """Another random model of the same vocabulary: its proposals are nearly all wrong, and every output is still
    the target's, greedy and sampled, with a KV cache small enough that sequences are preempted (the draft's
    record of what it has computed goes with their blocks)."""
    target_dir, draft_dir = tiny_dirs
    target = load(str(target_dir), dtype=torch.float32)
    tok = target.tokenizer
    requests = {f"r{i}": (tok.encode(f"Story {i}:" + " again" * i),
                          SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=48, ignore_eos=True,
                                         logprobs=1 if i % 3 == 0 else None))
                for i in range(6)}
    blocks = 14 * 16 * TINY_KV_BYTES_PER_TOKEN  # 14 blocks; a draft's cache has as many, of its own bytes
    plain_engine = make_engine(target, kv_cache_memory=blocks)
    plain = run(plain_engine, requests)
    engine = always_propose(make_engine(target, speculative_config=draft_config(draft_dir, k=3, max_rows=16),
                                        kv_cache_memory=2 * blocks))
    out = run(engine, requests)
    assert_same_outputs(out, plain, requests, tolerance=1e-5)
    stats = engine.stats()
    assert plain_engine.stats().num_preemptions > 0 and stats.num_preemptions > 0
    assert stats.spec_draft_tokens_total > 50
    assert stats.spec_accepted_tokens_total < 0.2 * stats.spec_draft_tokens_total
    assert_all_slots_free(engine)


@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_random_aborts_leave_no_block_held(tiny_dirs, method):
    """64 requests speculating (a draft model's proposals, or n-gram ones from the prompts' repeats), a third of
    them aborted at random steps: every slot and block comes back."""
    target_dir, draft_dir = tiny_dirs
    target = load(str(target_dir), dtype=torch.float32)
    spec = (draft_config(draft_dir, k=4, max_rows=16) if method == "draft_model" else
            json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "max_rows": 16}))
    engine = always_propose(make_engine(target, speculative_config=spec))
    rng = random.Random(0)
    tok = target.tokenizer
    for i in range(64):
        engine.add_request(f"r{i}", tok.encode(f"Request {i}" + " more" * rng.randrange(30)),
                           SamplingParams(temperature=rng.choice([0.0, 0.9]), max_tokens=rng.randrange(4, 40),
                                          ignore_eos=True))
    to_abort = set(rng.sample(range(64), 21))
    results: dict = {}
    steps = 0
    while engine.has_work():
        collect(engine.step(), results)
        steps += 1
        for i in sorted(to_abort):
            if rng.random() < 0.1:
                engine.abort(f"r{i}")
                to_abort.discard(i)
    assert engine.stats().spec_drafts_total > 0
    assert_all_slots_free(engine)


def test_compiled_draft_and_target_steps_coexist(tiny_dirs):
    """The draft's decode step and the target's, both compiled in one process: the target drafting for itself
    (the same weights, so nearly every proposal is accepted: dense float32 matrix products may round a row
    differently at another batch size, which flips a near tie of this random model now and then) and a random
    draft (nearly none) give what the compiled target alone gives."""
    target_dir, draft_dir = tiny_dirs
    target = load(str(target_dir), dtype=torch.float32)
    tok = target.tokenizer
    requests = {f"r{i}": (tok.encode(f"Tale {i}:" + " on" * i), SamplingParams(temperature=0.0, max_tokens=24,
                                                                            ignore_eos=True)) for i in range(3)}
    # a context shorter than the 256 tokens decode steps are timed at: timed within it
    config = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256, enforce_eager=False)
    plain = run(LLMEngine(target, EngineConfig(**config)), requests)
    for draft, expect_all in ((target_dir, True), (draft_dir, False)):
        engine = always_propose(LLMEngine(target, EngineConfig(speculative_config=draft_config(draft, max_rows=8),
                                                               **config)))
        assert engine.runner.decode_step is not None and engine.runner.draft.decode_step is not None
        out = run(engine, requests)
        assert_same_outputs(out, plain, requests)
        stats = engine.stats()
        assert stats.spec_draft_tokens_total > 20
        rate = stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total
        assert rate >= 0.9 if expect_all else rate < 0.2, rate


def test_a_draft_with_another_vocabulary_is_refused(smollm_bf16, tiny_dirs):
    with pytest.raises(ValueError, match="vocabulary of 128256 tokens, the target .* 49152"):
        make_engine(smollm_bf16, speculative_config=draft_config(tiny_dirs[1]))


@pytest.mark.parametrize("spec,error", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model .* is required"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "prompt_lookup_max applies to method ngram"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "model applies to method draft_model"),
])
def test_bad_draft_configurations_are_refused(spec, error):
    with pytest.raises(ValueError, match=error):
        EngineConfig(speculative_config=json.dumps(spec))


def test_a_draft_model_is_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        EngineConfig(speculative_config=draft_config("x"), tensor_parallel_size=2)


def test_verify_rows_through_the_cuda_attention_kernel_give_what_plain_decoding_gives(tiny_dirs):
    """The target's attention through the Triton kernel (the CUDA path; Triton's interpreter here), drafting for
    itself: accepted runs put several rows of one sequence in one kernel call, and tokens are those of plain
    decoding through the same kernel, logprobs too up to the rounding of this model's dense float32 projections,
    whose matrix products round a row differently at another batch size (a row reading stale K/V would be off by
    far more)."""
    from tests.helpers import set_attention_impl

    target_dir, _ = tiny_dirs
    target = load(str(target_dir), dtype=torch.float32)
    set_attention_impl(target.model, "triton")
    draft = load(str(target_dir), dtype=torch.float32)
    tok = target.tokenizer
    requests = {f"r{i}": (tok.encode(f"Song {i}:" + " la" * i), SamplingParams(temperature=0.0, max_tokens=16,
                                                                            ignore_eos=True, logprobs=1))
                for i in range(2)}
    plain = run(make_engine(target), requests)
    engine = LLMEngine(target, EngineConfig(enforce_eager=True, max_model_len=256, max_num_seqs=8,
                                            max_num_batched_tokens=256,
                                            speculative_config=draft_config(target_dir, k=3, max_rows=8)), draft=draft)
    always_propose(engine)
    out = run(engine, requests)
    assert_same_outputs(out, plain, requests, tolerance=1e-4)
    assert engine.stats().spec_accepted_tokens_total > 10


def tiny_vocab_model(seed: int, tokenizer) -> LoadedModel:
    """A random one-layer Llama over a vocabulary of 8 tokens (ids that Meta's tokenizer decodes as punctuation)."""
    from model.config import ModelConfig
    from model.loading import build_model
    from model.llama import Llama

    config = ModelConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=False, name="vocab-8")
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {name: torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.3
             for name, shape in shapes.items()}
    return LoadedModel(build_model(config, state.items()), tokenizer, config, f"vocab-8-seed-{seed}", 0.0)


def exact_pairs(model: LoadedModel, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(second token, third token) [8, 8] of the target, over every first token, spelled out here: softmax at the
    temperature after the frequency penalty (of the tokens generated so far), top-k and top-p as the OpenAI API
    defines them."""
    def distribution(generated: list[int]) -> torch.Tensor:
        ids = prompt + generated
        cache = KVCache(model.config, 1, 16)
        row = model.model(ForwardBatch.build([SequenceChunk(0, 0, ids)], block_size=16), cache)[-1].double()
        for t in generated:
            row[t] -= params.frequency_penalty
        probs = torch.softmax(row / params.temperature, dim=-1)
        if params.top_k:
            probs[probs < probs.topk(params.top_k).values[-1]] = 0
        order = probs.argsort(descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]  # mass of the more likely tokens
        probs[order[before >= params.top_p * probs.sum()]] = 0
        return probs / probs.sum()

    pairs = torch.zeros(8, 8, dtype=torch.float64)
    first = distribution([])
    for a in range(8):
        if first[a] > 0:
            second = distribution([a])
            for b in range(8):
                if second[b] > 0:
                    pairs[b] += first[a] * second[b] * distribution([a, b])
    return pairs


@pytest.mark.parametrize("name,params", [
    ("plain", SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)),
    ("top-k top-p", SamplingParams(temperature=0.8, top_k=5, top_p=0.85, max_tokens=3, ignore_eos=True)),
    ("penalised", SamplingParams(temperature=1.0, frequency_penalty=1.5, max_tokens=3, ignore_eos=True)),
])
def test_speculative_sampling_draws_the_targets_distribution(tiny_dirs, name, params):
    """On a vocabulary of 8 tokens, 4,000 unseeded samples of three tokens, each proposal the target's own greedy
    choice (so it is accepted as often as the sample lands on it, and a verify step that favoured its proposals
    would skew the distribution toward the argmax): the third token is a verify row's sample when the proposal for the second was
    accepted, a later step's when not, and the empirical distribution of the (second, third) pair is the target's,
    computed exactly, within sampling noise (total variation under 1.5 times what sampling alone gives in
    expectation)."""
    tokenizer = load(str(tiny_dirs[0]), dtype=torch.float32).tokenizer
    # the draft proposes the target's own argmax: accepted only as often as the sample lands on it
    target, draft = tiny_vocab_model(1, tokenizer), tiny_vocab_model(1, tokenizer)
    prompt = [1, 2, 3]
    spec = json.dumps({"method": "draft_model", "model": "vocab-8-seed-1", "num_speculative_tokens": 2,
                       "max_rows": 48})
    engine = always_propose(LLMEngine(target, EngineConfig(enforce_eager=True, max_model_len=64, max_num_seqs=48,
                                                           max_num_batched_tokens=256, speculative_config=spec),
                                      draft=draft))
    counts = torch.zeros(8, 8, dtype=torch.float64)
    samples, group = 4000, 16  # 16 at a time: room in each step for their proposals
    results: dict = {}
    for start in range(0, samples, group):
        for i in range(start, start + group):
            engine.add_request(f"s{i}", prompt, params)
        while engine.has_work():
            collect(engine.step(), results)
    for result in results.values():
        _, b, c = result.token_ids
        counts[b, c] += 1
    stats = engine.stats()
    assert 0.1 < stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total < 0.9  # proposals both ways
    exact = exact_pairs(target, prompt, params)
    distance = 0.5 * (counts / samples - exact).abs().sum().item()
    noise = 0.5 * (2 * exact * (1 - exact) / (torch.pi * samples)).sqrt().sum().item()  # its expectation if exact
    assert distance < 1.5 * noise, (name, distance, noise)
