"""The batched sampler against distributions and penalties computed plainly from the logits, in the test."""

import math

import pytest
import torch

from server.engine.sampling_params import SamplingParams
from server.worker.sampler import Sampler, SampleRow, apply_penalties, filter_logits

# Chi-square critical values at significance 0.001, by degrees of freedom.
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def row(slot: int = 0, generator=None, num_generated: int = 0, eos=(), **params) -> SampleRow:
    return SampleRow(slot, SamplingParams(**params), generator, num_generated, frozenset(eos))


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    return [x / sum(e) for x in e]


# --- greedy and logit bias ----------------------------------------------------------------------------

def test_greedy_is_argmax_and_ties_go_to_the_lowest_id():
    logits = random_logits(6, 50, seed=0)
    logits[5, 7] = logits[5, 31] = logits[5].max() + 1.0   # a tie for the maximum
    sampler = Sampler(num_slots=6, vocab_size=50)
    out = sampler.sample(logits.clone(), [row(slot=i, temperature=0.0) for i in range(6)])
    expected = [max(range(50), key=lambda t: (logits[i, t].item(), -t)) for i in range(6)]
    assert out.token_ids == expected
    assert out.token_ids[5] == 7


def test_logit_bias_forces_and_bans_tokens():
    logits = random_logits(2, 30, seed=1)
    best = logits.argmax(dim=-1).tolist()
    weakest = logits[0].argmin().item()
    second = sorted(range(30), key=lambda t: -logits[1, t].item())[1]
    sampler = Sampler(num_slots=2, vocab_size=30)
    rows = [row(slot=0, temperature=0.0, logit_bias={weakest: 100.0}),
            row(slot=1, temperature=0.0, logit_bias={best[1]: -100.0})]
    assert sampler.sample(logits.clone(), rows).token_ids == [weakest, second]
    # Also when sampling at temperature 1: +100 makes every other token e^-100 less likely.
    sampled = sampler.sample(logits[:1].clone(), [row(temperature=1.0, logit_bias={weakest: 100.0})])
    assert sampled.token_ids == [weakest]


def test_out_of_range_token_ids_are_rejected():
    sampler = Sampler(num_slots=1, vocab_size=10)
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(1, 10), [row(logit_bias={10: 1.0})])
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(1, 10), [row(min_tokens=1, stop_token_ids=[12])])
    with pytest.raises(ValueError):
        sampler.start_sequence(0, [3, 10], SamplingParams(repetition_penalty=1.2))


# --- penalties ----------------------------------------------------------------------------------------

RAW = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0]
PROMPT = [0, 1]
OUTPUT = [4, 4, 4, 2, 3]


def expected_penalised(raw, prompt, output, repetition, frequency, presence) -> list[float]:
    """The vLLM/OpenAI definitions, one token at a time."""
    result = []
    for token, x in enumerate(raw):
        count = output.count(token)
        if token in prompt or count > 0:
            x = x / repetition if x > 0 else x * repetition
        result.append(x - frequency * count - presence * (1.0 if count > 0 else 0.0))
    return result


@pytest.mark.parametrize("repetition, frequency, presence", [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0),
                                                             (1.0, 0.0, 1.5), (1.2, 0.4, -0.6)])
def test_penalties_match_the_definitions(repetition, frequency, presence):
    expected = expected_penalised(RAW, PROMPT, OUTPUT, repetition, frequency, presence)
    assert expected != RAW
    V = len(RAW)
    counts = torch.zeros(1, V, dtype=torch.int32)
    for t in OUTPUT:
        counts[0, t] += 1
    mask = torch.zeros(1, V, dtype=torch.bool)
    mask[0, PROMPT] = True
    direct = apply_penalties(torch.tensor([RAW]), counts, mask, torch.tensor([repetition]),
                             torch.tensor([frequency]), torch.tensor([presence]))
    assert direct[0].tolist() == pytest.approx(expected, abs=1e-6)

    # Through the sampler: history restored by start_sequence, in a slot other than 0.
    params = dict(repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence)
    sampler = Sampler(num_slots=3, vocab_size=V)
    sampler.start_sequence(2, PROMPT, SamplingParams(**params), output_ids=OUTPUT)
    processed = sampler.process_logits(torch.tensor([RAW]), [row(slot=2, **params)])
    assert processed[0].tolist() == pytest.approx(expected, abs=1e-6)
    greedy = sampler.sample(torch.tensor([RAW]), [row(slot=2, temperature=0.0, **params)])
    assert greedy.token_ids == [max(range(V), key=lambda t: (expected[t], -t))]


def test_penalty_changes_the_greedy_choice():
    # Token 4 leads without penalties; repeated three times with frequency 0.7 it drops below token 0.
    expected = expected_penalised(RAW, PROMPT, OUTPUT, 1.0, 0.7, 0.0)
    assert RAW.index(max(RAW)) == 4 and expected.index(max(expected)) == 0
    sampler = Sampler(num_slots=1, vocab_size=len(RAW))
    sampler.start_sequence(0, PROMPT, SamplingParams(frequency_penalty=0.7), output_ids=OUTPUT)
    assert sampler.sample(torch.tensor([RAW]), [row(temperature=0.0, frequency_penalty=0.7)]).token_ids == [0]


def test_sample_records_tokens_for_later_penalties():
    # Flat logits, greedy, presence penalty: each chosen token is penalised next step, so the lowest
    # unused id wins every time. Without the recording every step would choose 0.
    sampler = Sampler(num_slots=2, vocab_size=5)
    params = dict(temperature=0.0, presence_penalty=1.0)
    sampler.start_sequence(1, [0, 1], SamplingParams(**params))   # presence ignores the prompt
    tokens = [sampler.sample(torch.zeros(1, 5), [row(slot=1, **params)]).token_ids[0] for _ in range(5)]
    assert tokens == [0, 1, 2, 3, 4]
    assert sampler.output_counts[1].tolist() == [1, 1, 1, 1, 1]
    assert sampler.output_counts[0].tolist() == [0, 0, 0, 0, 0]


def test_verify_rows_count_their_preceding_proposals_and_only_emitted_tokens_count():
    """A speculating sequence's verify rows: row j's penalties count the proposals before it, as if they had been
    chosen; the rows' own choices are not counted (`counted=False`) until the emitted ones are (`count`)."""
    sampler = Sampler(num_slots=1, vocab_size=5)
    params = dict(temperature=0.0, presence_penalty=1.0)
    sampler.start_sequence(0, [4], SamplingParams(**params))
    base = SamplingParams(**params)
    rows = [SampleRow(0, base, preceding=preceding, counted=False) for preceding in ((), (0,), (0, 1))]
    assert sampler.sample(torch.zeros(3, 5), rows).token_ids == [0, 1, 2]  # flat logits: the lowest uncounted id
    assert sampler.output_counts[0].tolist() == [0, 0, 0, 0, 0]
    sampler.count(0, [0, 1])
    assert sampler.output_counts[0].tolist() == [1, 1, 0, 0, 0]
    assert sampler.sample(torch.zeros(1, 5), [row(**params)]).token_ids == [2]


def test_counts_and_prompt_are_reset_when_a_slot_is_reused():
    sampler = Sampler(num_slots=1, vocab_size=4)
    first = dict(temperature=0.0, logit_bias={0: 100.0}, repetition_penalty=2.0)
    sampler.start_sequence(0, [1], SamplingParams(**first))
    for _ in range(3):
        sampler.sample(torch.zeros(1, 4), [row(**first)])   # the first occupant outputs token 0 three times
    assert sampler.output_counts[0, 0].item() == 3

    second = dict(temperature=0.0, frequency_penalty=1.0, repetition_penalty=2.0)
    sampler.start_sequence(0, [2], SamplingParams(**second))
    # Token 0 leads and token 1 is close: leaked counts of 0 or a leaked prompt mask on 1 would change
    # this choice; the new prompt token 2 must be penalised (4.0 / 2 = 2.0 < 2.5).
    logits = torch.tensor([[3.0, 2.9, 4.0, 2.5]])
    expected = expected_penalised(logits[0].tolist(), [2], [], 2.0, 1.0, 0.0)
    assert sampler.process_logits(logits.clone(), [row(**second)])[0].tolist() == pytest.approx(expected)
    assert sampler.sample(logits, [row(**second)]).token_ids == [0]


# --- temperature, top-k, top-p, min-p -----------------------------------------------------------------

LOGITS = [2.0, 1.6, 1.3, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -2.0]


def expected_distribution(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Temperature, then top-k, top-p and min-p, each renormalising, written out plainly."""
    z = [x / temperature for x in logits]
    keep = set(range(len(z)))
    if top_k:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = {t for t in keep if z[t] >= kth}
    p = softmax([z[t] if t in keep else -math.inf for t in range(len(z))])
    if top_p < 1.0:
        nucleus, mass = set(), 0.0
        for t in sorted(keep, key=lambda t: -p[t]):
            nucleus.add(t)
            mass += p[t]
            if mass >= top_p:
                assert mass - top_p > 1e-3, "top_p on a float boundary makes the test ambiguous"
                break
        keep = nucleus
        p = softmax([z[t] if t in keep else -math.inf for t in range(len(z))])
    if min_p > 0.0:
        keep = {t for t in keep if p[t] >= min_p * max(p)}
        p = softmax([z[t] if t in keep else -math.inf for t in range(len(z))])
    return p


def assert_matches(tokens: list[int], expected: list[float]):
    n = len(tokens)
    observed = [tokens.count(t) for t in range(len(expected))]
    support = [t for t, p in enumerate(expected) if p > 0]
    assert all(observed[t] == 0 for t, p in enumerate(expected) if p == 0), (observed, expected)
    if len(support) > 1:
        chi2 = sum((observed[t] - n * expected[t]) ** 2 / (n * expected[t]) for t in support)
        assert chi2 < CHI2_CRITICAL[len(support) - 1], (chi2, observed, [n * p for p in expected])
    else:
        assert observed[support[0]] == n


GROUPS = [dict(temperature=0.7), dict(temperature=1.3, top_k=4), dict(temperature=1.0, top_p=0.75),
          dict(temperature=0.9, min_p=0.2), dict(temperature=1.5, top_k=6, top_p=0.8, min_p=0.3),
          dict(temperature=1.0, top_k=1)]


def test_empirical_distributions_match_in_one_mixed_batch():
    # Every group shares one batch, so per-row parameters must not leak between rows.
    n = 20_000
    sampler = Sampler(num_slots=n * len(GROUPS), vocab_size=len(LOGITS), seed=0)
    rows = [SampleRow(g * n + i, params) for g, params in enumerate(SamplingParams(**p) for p in GROUPS)
            for i in range(n)]
    logits = torch.tensor([LOGITS]).repeat(len(rows), 1)
    tokens = sampler.sample(logits, rows).token_ids
    for g, params in enumerate(GROUPS):
        expected = expected_distribution(LOGITS, **params)
        assert_matches(tokens[g * n:(g + 1) * n], expected)
    # The filters must actually cut something, else the test could not catch a missing one.
    assert sum(p == 0 for p in expected_distribution(LOGITS, **GROUPS[3])) >= 3


def test_seeded_rows_draw_the_right_distribution():
    # The per-row generator path, with one generator shared by all rows so the draws are independent.
    n, params = 20_000, dict(temperature=0.8, top_p=0.9)
    generator = torch.Generator().manual_seed(5)
    sampler = Sampler(num_slots=n, vocab_size=len(LOGITS))
    tokens = sampler.sample(torch.tensor([LOGITS]).repeat(n, 1),
                            [SampleRow(i, SamplingParams(**params), generator) for i in range(n)]).token_ids
    assert_matches(tokens, expected_distribution(LOGITS, **params))


def test_filter_logits_keeps_exactly_the_expected_sets():
    logits = torch.tensor([LOGITS, LOGITS, LOGITS])
    kept = filter_logits(logits, top_k=torch.tensor([3, 0, 0]), top_p=torch.tensor([1.0, 0.6, 1.0]),
                         min_p=torch.tensor([0.0, 0.0, 0.5]), max_top_k=3).isfinite()
    for i, params in enumerate([dict(top_k=3), dict(top_p=0.6), dict(min_p=0.5)]):
        expected = [p > 0 for p in expected_distribution(LOGITS, 1.0, **params)]
        assert kept[i].tolist() == expected
    # top-k alone takes the partial-topk path, with a row that opts out.
    kept = filter_logits(logits[:2], top_k=torch.tensor([2, 0]), max_top_k=2).isfinite()
    assert kept.sum(dim=-1).tolist() == [2, len(LOGITS)]
    # A row with top_p = 1 keeps even the tail that a float32 cumsum cannot resolve (1 - 2e-8 rounds to 1).
    peaked = torch.tensor([[20.0] + [0.0] * 9, LOGITS])
    kept = filter_logits(peaked, top_p=torch.tensor([1.0, 0.6])).isfinite()
    assert kept[0].all()


# --- seeds --------------------------------------------------------------------------------------------

def run_seeded(seed: int, alone: bool, steps: int = 12, sample_index: int = 0) -> list[int]:
    """A seeded row (with penalties, so slot bookkeeping matters too), alone or in 16 mixed rows."""
    vocab, target = 64, dict(temperature=1.0, top_p=0.95, frequency_penalty=0.5, seed=seed)
    others = [dict(temperature=0.0), dict(temperature=0.9, seed=seed + 1), dict(temperature=1.2, top_k=5),
              dict(temperature=0.7, min_p=0.1, seed=99), dict(temperature=1.0, presence_penalty=1.0)]
    specs = [target] if alone else [others[i % len(others)] for i in range(15)]
    position = 0 if alone else 7
    if not alone:
        specs.insert(position, target)
    sampler = Sampler(num_slots=20, vocab_size=vocab)
    slots = [0] if alone else list(range(3, 19))   # the target sits in a different slot in the batch
    generators = [sampler.start_sequence(slot, [1, 2, 3], SamplingParams(**spec),
                                         sample_index=sample_index if spec is target else 0)
                  for slot, spec in zip(slots, specs)]
    tokens = []
    for step in range(steps):
        logits = random_logits(len(specs), vocab, seed=1000 + step)
        logits[position] = random_logits(1, vocab, seed=step)[0]   # the target's logits do not change
        rows = [row(slot=slot, generator=g, num_generated=step, **spec)
                for slot, g, spec in zip(slots, generators, specs)]
        tokens.append(sampler.sample(logits, rows).token_ids[position])
    return tokens


def test_a_seed_gives_the_same_tokens_alone_or_in_a_mixed_batch():
    assert run_seeded(1234, alone=True) == run_seeded(1234, alone=False)
    assert run_seeded(1234, alone=True) != run_seeded(4321, alone=True)


def test_n_samples_of_one_seed_differ_and_are_reproducible():
    first, second = run_seeded(7, alone=True, sample_index=0), run_seeded(7, alone=True, sample_index=1)
    assert first != second
    assert second == run_seeded(7, alone=False, sample_index=1)


# --- min_tokens ---------------------------------------------------------------------------------------

def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos, stop = 3, 5
    logits = torch.tensor([[0.0, 1.0, 0.5, 9.0, 0.2, 8.0, 1.5, -1.0]])
    sampler = Sampler(num_slots=1, vocab_size=8)
    choices = [sampler.sample(logits.clone(), [row(temperature=0.0, num_generated=k, eos=[eos], min_tokens=2,
                                                   stop_token_ids=[stop])]).token_ids[0] for k in range(3)]
    assert choices == [6, 6, eos]
    # ignore_eos: EOS cannot end the sequence, so it is not banned; stop ids still are.
    out = sampler.sample(logits.clone(), [row(temperature=0.0, eos=[eos], min_tokens=2, stop_token_ids=[stop],
                                              ignore_eos=True)])
    assert out.token_ids == [eos]
    logits[0, eos] = -100.0
    out = sampler.sample(logits.clone(), [row(temperature=0.0, eos=[eos], min_tokens=2, stop_token_ids=[stop],
                                              ignore_eos=True)])
    assert out.token_ids == [6]


def test_min_tokens_bans_eos_when_sampling():
    n, eos = 5000, 0
    sampler = Sampler(num_slots=n, vocab_size=4, seed=1)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]]).repeat(n, 1)   # EOS would be drawn ~70% of the time
    rows = [row(slot=i, num_generated=1, eos=[eos], min_tokens=3, stop_token_ids=[2]) for i in range(n)]
    tokens = sampler.sample(logits, rows).token_ids
    assert set(tokens) == {1, 3}


# --- logprobs -----------------------------------------------------------------------------------------

def test_logprobs_come_from_the_raw_logits():
    vocab = 40
    logits = random_logits(4, vocab, seed=3)
    ks = [None, 0, 5, 20]
    rows = [row(slot=i, logprobs=k, temperature=t, repetition_penalty=1.5, logit_bias={1: 3.0}, seed=i)
            for i, (k, t) in enumerate(zip(ks, [0.0, 1.3, 0.0, 0.6]))]
    sampler = Sampler(num_slots=4, vocab_size=vocab)
    for i, r in enumerate(rows):
        r.generator = sampler.start_sequence(i, [1, 2], r.params)
    out = sampler.sample(logits.clone(), rows)
    for i, k in enumerate(ks):
        raw = logits[i].double()
        lse = math.log(sum(math.exp(x) for x in raw.tolist()))
        expected_logprobs = [x - lse for x in raw.tolist()]
        if k is None:
            assert math.isnan(out.logprobs[i]) and out.top_token_ids[i] == [] and out.top_logprobs[i] == []
            continue
        assert out.logprobs[i] == pytest.approx(expected_logprobs[out.token_ids[i]], abs=1e-5)
        ranked = sorted(range(vocab), key=lambda t: -expected_logprobs[t])[:k]
        assert out.top_token_ids[i] == ranked
        assert out.top_logprobs[i] == pytest.approx([expected_logprobs[t] for t in ranked], abs=1e-5)
        assert out.top_logprobs[i] == sorted(out.top_logprobs[i], reverse=True)
    assert all(isinstance(t, int) for t in out.token_ids)


def test_empty_batch():
    out = Sampler(num_slots=1, vocab_size=8).sample(torch.zeros(0, 8), [])
    assert out.token_ids == [] and out.logprobs == []
