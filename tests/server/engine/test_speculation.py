"""Speculative decoding with n-gram proposals (server/engine/speculation.py): greedy outputs are the ones without
speculation, token for token, while proposals are accepted; its limits and its configuration."""

from __future__ import annotations

import json

import pytest
import torch

from model.loading import load
from server.engine.config import EngineConfig
from server.engine.sampling_params import SamplingParams
from server.engine.speculation import SpeculationBudget, SpeculativeConfig, propose
from tests.server.engine.helpers import always_propose, assert_all_slots_free, make_engine, run

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                    "prompt_lookup_min": 1})
# Input-grounded texts (the answer copies from the prompt), and one free-form.
TEXTS = [
    "Copy this list exactly.\nList: apples, pears, plums, grapes, lemons, limes, cherries, peaches.\n"
    "Copy: apples, pears,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is",
    "Write one sentence about the sea:",
]


@pytest.fixture(scope="module")
def smollm_bf16():
    return load(None, dtype=torch.bfloat16, quantization="auto")


def test_propose_copies_what_followed_the_latest_earlier_occurrence():
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert propose(tokens, 3, 4, 2) == [4, 5, 9]      # [1, 2, 3] occurred at 0
    assert propose(tokens, 3, 4, 4) == []             # no earlier 4-gram [9, 1, 2, 3]
    assert propose([5, 1, 2, 6, 1, 2, 7, 1, 2], 2, 2, 2) == [7, 1]  # the latest occurrence wins
    assert propose([7, 7, 7], 5, 3, 1) == [7]         # overlapping its own suffix
    assert propose([3], 2, 3, 1) == []


@pytest.mark.parametrize("text,error", [
    ("not json", "must be a JSON object"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be one of"),
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "positive integer"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}',
     "must not exceed"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}', "unknown key"),
])
def test_bad_configurations_are_refused_at_start_up(text, error):
    with pytest.raises(ValueError, match=error):
        EngineConfig(speculative_config=text)


def test_speculation_is_accepted_on_cuda():
    """The CUDA attention kernel writes every row's K/V before any row attends (tests/model/kernels/
    test_triton_decode.py), so verify rows of one sequence are exact there too."""
    assert EngineConfig(device="cuda", speculative_config=NGRAM).speculation.method == "ngram"


def test_one_lookup_bound_sets_the_other_as_vllm_does():
    spec = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (5, 5)


def test_greedy_outputs_are_unchanged_and_proposals_are_accepted(smollm_bf16):
    """Each text alone and all together (so verifying rows share steps with other sequences' rows), with stop
    strings, max_tokens and EOS ending runs of accepted tokens: the same tokens, text and finish as without
    speculation; proposals were accepted; no block is left held."""
    tok = smollm_bf16.tokenizer
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=37, stop=["mul", "\n\n\n"]),
              SamplingParams(temperature=0.0, max_tokens=30),
              SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True)]
    requests = {f"r{i}": (tok.encode(text), p) for i, (text, p) in enumerate(zip(TEXTS, params))}
    plain = run(make_engine(smollm_bf16), requests)
    engine = always_propose(make_engine(smollm_bf16, speculative_config=NGRAM))
    together = run(engine, requests)
    alone = {}
    for rid, request in requests.items():
        alone.update(run(engine, {rid: request}))
    for rid in requests:
        expected = plain[(rid, 0)]
        for got in (together[(rid, 0)], alone[(rid, 0)]):
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
                expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason), rid
    stats = engine.stats()
    assert stats.spec_drafts_total > 0 and stats.spec_accepted_tokens_total > stats.spec_drafts_total // 2
    assert stats.spec_accepted_per_position[0] >= stats.spec_accepted_per_position[-1]
    # each request's own counts (the request log's acceptance) add up to the engine's, over both runs
    metrics = [r[(rid, 0)].metrics for r in (together, alone) for rid in requests]
    assert sum(m.num_draft_tokens for m in metrics) == stats.spec_draft_tokens_total
    assert sum(m.num_accepted_tokens for m in metrics) == stats.spec_accepted_tokens_total
    assert all(0 <= m.num_accepted_tokens <= m.num_draft_tokens for m in metrics)
    assert_all_slots_free(engine)


def test_seeded_sampled_and_logprob_requests_speculate_and_give_what_plain_decoding_gives(smollm_bf16):
    """Sampled requests with a seed (temperature alone; with top-k, top-p and min-p), requests asking for logprobs
    (greedy and sampled), with logit_bias and with min_tokens speculate beside a greedy one and give the tokens,
    and the logprobs, they give without speculation: each verify row is processed as at its position and sampled
    with the noise plain decoding draws there, and its logprobs come from the logits plain decoding computes."""
    tok = smollm_bf16.tokenizer
    ids = tok.encode(TEXTS[0])  # a list to copy: proposals get accepted
    requests = {
        "greedy": (ids, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)),
        "logprobs": (ids, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)),
        "warm": (ids, SamplingParams(temperature=0.3, seed=3, max_tokens=32, ignore_eos=True)),
        "filtered": (ids, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=11, max_tokens=32,
                                         ignore_eos=True)),
        "sampled logprobs": (ids, SamplingParams(temperature=0.5, seed=5, max_tokens=32, ignore_eos=True,
                                                 logprobs=3)),
        "biased": (ids, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                       logit_bias={tok.encode(" plums")[0]: 3.0, tok.encode(",")[0]: -2.0})),
        "min_tokens": (ids, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=24)),
    }
    plain = run(make_engine(smollm_bf16), requests)
    wide = json.dumps({**json.loads(NGRAM), "max_rows": 16})  # eight sequences, room for proposals beside them
    engine = always_propose(make_engine(smollm_bf16, speculative_config=wide))
    together = run(engine, requests)
    alone = run(engine, {"warm": requests["warm"]})
    for rid in requests:
        assert together[(rid, 0)].token_ids == plain[(rid, 0)].token_ids, rid
        assert together[(rid, 0)].logprobs == plain[(rid, 0)].logprobs, rid  # bitwise: the same rows
    assert len(together[("logprobs", 0)].logprobs) == 32 and len(together[("logprobs", 0)].logprobs[0].top) == 2
    assert alone[("warm", 0)].token_ids == plain[("warm", 0)].token_ids
    for rid in ("warm", "filtered", "logprobs", "sampled logprobs", "biased", "min_tokens"):
        m = together[(rid, 0)].metrics
        assert m.num_draft_tokens > 0, rid  # it did speculate
    assert together[("warm", 0)].metrics.num_accepted_tokens > 0
    assert_all_slots_free(engine)


def test_no_proposals_once_the_step_is_full(smollm_bf16):
    """max_rows 2 with three decoding sequences: no step has room, so nothing is proposed."""
    tok = smollm_bf16.tokenizer
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "max_rows": 2})
    engine = always_propose(make_engine(smollm_bf16, speculative_config=spec))
    ids = tok.encode(TEXTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", ids, params)
    while engine.has_work():
        engine.step()
    assert engine.stats().spec_drafts_total == 0


def test_penalized_requests_speculate_and_give_what_plain_decoding_gives(smollm_bf16):
    """Penalties count the tokens chosen before: each verify row counts the proposals before it, and only the
    emitted tokens join the sequence's counts. Strong enough that counting wrongly changes tokens (the list's
    separators repeat); greedy and sampled with a seed, each alone, and a negative penalty."""
    tok = smollm_bf16.tokenizer
    ids = tok.encode(TEXTS[0])
    for params in (SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, repetition_penalty=1.05,
                                  frequency_penalty=1.0, presence_penalty=0.2),
                   SamplingParams(temperature=0.5, seed=2, max_tokens=32, ignore_eos=True, frequency_penalty=1.0),
                   # a negative penalty favours repeats: long accepted runs, whose rows must count each other
                   SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, frequency_penalty=-1.0)):
        plain = run(make_engine(smollm_bf16), {"r": (ids, params)})
        engine = always_propose(make_engine(smollm_bf16, speculative_config=NGRAM))
        out = run(engine, {"r": (ids, params)})
        assert out[("r", 0)].token_ids == plain[("r", 0)].token_ids, params
        assert out[("r", 0)].metrics.num_accepted_tokens > 0, params
        assert_all_slots_free(engine)


def test_structured_outputs_speculate_and_give_what_plain_decoding_gives(smollm_bf16):
    """A JSON schema (greedy, and sampled with a seed) beside an unconstrained request: each verify row is masked by
    the grammar as at its position (the matcher takes the proposals and rolls back), so the outputs are those
    without speculation, they validate, and the constrained requests speculated."""
    import jsonschema

    from server.engine.grammar import GrammarCompiler, GrammarSpec

    tok = smollm_bf16.tokenizer
    schema = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
              "required": ["fruits"], "additionalProperties": False}
    compiled = GrammarCompiler(tok, smollm_bf16.config.vocab_size).compile(
        GrammarSpec("json_schema", json.dumps(schema), "response_format"))
    ids = tok.encode('Copy this JSON exactly.\nJSON: {"fruits": ["apples", "pears", "plums", "grapes", "lemons"]}\n'
                     'Copy: {"fruits": ["apples", "pears",')
    constrained = dict(grammar=compiled, grammar_param="response_format", max_tokens=48)
    requests = {"greedy": (ids, SamplingParams(temperature=0.0, **constrained)),
                "sampled": (ids, SamplingParams(temperature=0.6, seed=9, **constrained)),
                "free": (ids, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))}
    plain = run(make_engine(smollm_bf16), requests)
    engine = always_propose(make_engine(smollm_bf16, speculative_config=NGRAM))
    out = run(engine, requests)
    for rid in requests:
        assert out[(rid, 0)].error is None and plain[(rid, 0)].error is None, rid
        assert out[(rid, 0)].token_ids == plain[(rid, 0)].token_ids, rid
    for rid in ("greedy", "sampled"):
        jsonschema.validate(json.loads(out[(rid, 0)].text), schema)
        assert out[(rid, 0)].metrics.num_draft_tokens > 0, rid
    assert out[("greedy", 0)].metrics.num_accepted_tokens > 0
    assert_all_slots_free(engine)


def budget(step, draft=None, k=4, max_rows=8):
    spec = SpeculativeConfig("ngram" if draft is None else "draft_model", k, max_rows=max_rows)
    return SpeculationBudget(spec, step, draft)


def test_the_budget_fills_a_step_while_rows_are_nearly_free_and_stops_where_they_cost():
    flat = [0.010 + 0.0002 * r for r in range(1, 9)]       # bound by reading the weights: rows nearly free
    assert budget(flat).rows(1) == 4 and budget(flat).rows(3) == 5  # one sequence proposes k at most
    linear = [0.010 * r for r in range(1, 9)]              # every row costs as much as the first
    assert budget(linear).rows(1) == 0                     # half the proposals accepted never pays for a row
    assert budget(flat).rows(8) == 0 and budget(None).rows(5) == 3  # no room; unmeasured: up to max_rows


def test_a_draft_as_costly_as_the_target_is_not_run_and_a_cheap_one_is():
    step = [0.010] * 8
    assert budget(step, draft=[0.010] * 8).rows(1) == 0    # k draft steps + a verify for 1 + 4a tokens, a = 0.5
    assert budget(step, draft=[0.001] * 8).rows(1) == 4    # one sequence proposes its k
    assert budget(step, draft=[0.001] * 8).rows(2) == 6    # two sequences share what the step has room for


def test_the_budget_follows_measured_acceptance_and_looks_again_later():
    b = budget([0.010 + 0.002 * r for r in range(1, 9)])
    assert b.rows(1) > 0
    for _ in range(100):
        b.verified(4, 0)                                   # nothing accepted, again and again
    assert b.acceptance < 0.05 and b.rows(1) == 0
    steps = 0
    while b.rows(1) == 0:                                  # steps without proposals: back toward the prior
        b.no_proposals()
        steps += 1
    assert 10 < steps < 200


def test_measured_times_never_make_a_bigger_step_look_cheaper():
    b = budget([0.010, 0.012, 0.008, 0.013, 0.013, 0.013, 0.013, 0.013])
    assert b.step_seconds[:3] == [0.010, 0.012, 0.012]


def test_a_draft_as_costly_as_the_target_is_measured_and_left_unused(smollm_bf16):
    """The measured budget at start-up: the default model drafting for itself costs k target steps for at most k
    tokens, so nothing is proposed, and the outputs are plain decoding's."""
    from model.paths import default_gguf_path

    tok = smollm_bf16.tokenizer
    requests = {"r": (tok.encode(TEXTS[0]), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))}
    spec = json.dumps({"method": "draft_model", "model": str(default_gguf_path()), "num_speculative_tokens": 4})
    engine = make_engine(smollm_bf16, speculative_config=spec)
    out = run(engine, requests)
    assert out[("r", 0)].token_ids == run(make_engine(smollm_bf16), requests)[("r", 0)].token_ids
    assert engine.stats().spec_drafts_total == 0 and engine.scheduler.budget.draft_seconds is not None
