"""Speculative decoding: proposals verified in the decode step itself.

Two proposers, one contract (the scheduler holds blocks for a sequence's newest token and up to k proposals;
the verify step below does not care where they came from):
- `ngram` (prompt lookup): a sequence whose last n tokens (n from `prompt_lookup_max` down to
  `prompt_lookup_min`) occurred earlier in its prompt or output proposes the k tokens that followed that
  occurrence; made by the scheduler, from the tokens alone.
- `draft_model`: a smaller model with the same vocabulary proposes its k greedy tokens, run batched over the
  speculating sequences just before the step (server/worker/draft.py), with a KV cache of its own indexed by the
  same block tables.
The step then runs its last token and the
proposals as 1 + k decode rows at successive positions: every row is computed exactly as one step per token would
compute it (packed kernels and elementwise code per row; the attention kernel writes every row's K/V before any
row attends), so row j's logits are those one-at-a-time decoding would give after accepting proposals 0..j-1.
Acceptance keeps the longest prefix of proposals equal to the rows' own choices, plus the choice after it. Greedy,
a row's choice is its argmax. Sampled (temperature, top-k, top-p, min-p), each row is sampled from its own
logits with the noise plain decoding would draw at that position (a seeded sequence's generator is wound back
to match what was emitted; server/worker/runner.py), so the emitted tokens are exactly the ones plain decoding
samples: the target's distribution, and for a seed the same tokens. Either way the output is the one without
speculation, token for token. (vLLM's rejection sampling keeps the distribution but not the tokens; with
proposals that are one token each, accepting exactly when the sampled token equals the proposal is that
rejection sampling with its residual draw made from the same noise.) K/V rows of rejected proposals lie past
the sequence's length, where its next steps overwrite them; the prefix cache only ever registers blocks of
accepted tokens.

Logprobs of the emitted tokens come from the verify rows, which are the rows plain decoding computes; logit_bias
and min_tokens apply to each row as at its position; a structured output's grammar masks each row as at its
position (server/worker/grammar_masks.verify_masks: the matcher takes the proposals, then rolls back; the engine
then advances it through the emitted tokens as for any token); penalties count each row's earlier proposals, and
only the emitted tokens join the sequence's counts.

Load-aware (`SpeculationBudget`): each step gets the number of proposal rows that maximises its expected tokens
per second, from what was measured at start-up (the decode step's time by its rows, and a draft step's) and the
acceptance measured since: extra rows are nearly free while a step is bound by reading the weights and cost real
compute after, a draft's steps cost what they cost, and proposals nobody accepts are not worth a row. Never more
than `max_rows` decode rows a step, proposals included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.engine.sequence import Sequence

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    max_rows: int = 8  # decode rows per step (proposals included) up to which proposals are made
    model: str | None = None  # draft_model: the draft's checkpoint (a .gguf file, a directory or a Hub repo id)

    @classmethod
    def parse(cls, text: str | dict) -> SpeculativeConfig:
        """vLLM's --speculative-config: a JSON object (or a dict, from a YAML preset)."""
        try:
            spec = json.loads(text) if isinstance(text, str) else dict(text)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"speculative_config must be a JSON object: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "max_rows"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}")
        method = spec.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {method!r}")
        lookup = sorted({"prompt_lookup_max", "prompt_lookup_min"} & set(spec))
        if method == "draft_model":
            if not isinstance(spec.get("model"), str) or not spec["model"]:
                raise ValueError("speculative_config.model (the draft model's path or repo id) is required with "
                                 "method draft_model")
            if lookup:
                raise ValueError(f"speculative_config.{lookup[0]} applies to method ngram, not draft_model")
        elif "model" in spec:
            raise ValueError("speculative_config.model applies to method draft_model, not ngram")
        ints = {}
        for key, default in (("num_speculative_tokens", None), ("prompt_lookup_max", None),
                             ("prompt_lookup_min", None), ("max_rows", cls.max_rows)):
            value = spec.get(key, default)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config.{key} must be a positive integer, got {value!r}")
            ints[key] = value
        if ints["num_speculative_tokens"] is None:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        if ints["num_speculative_tokens"] > 16:
            raise ValueError("speculative_config.num_speculative_tokens must be at most 16")
        # As vLLM: one bound given, the other takes its value; neither, the defaults.
        lo, hi = ints["prompt_lookup_min"], ints["prompt_lookup_max"]
        if lo is None and hi is None:
            lo, hi = cls.prompt_lookup_min, cls.prompt_lookup_max
        lo, hi = lo if lo is not None else hi, hi if hi is not None else lo
        if lo > hi:
            raise ValueError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max")
        return cls(method, ints["num_speculative_tokens"], hi, lo, ints["max_rows"], spec.get("model"))


def accepted_length(proposals: list[int], targets: list[int]) -> int:
    """How many leading proposals equal the verify rows' tokens (the target's choices at those positions)."""
    accepted = 0
    while accepted < len(proposals) and proposals[accepted] == targets[accepted]:
        accepted += 1
    return accepted


def propose(tokens: list[int], k: int, longest: int, shortest: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (from `longest`
    down to `shortest` tokens) found earlier in them; [] when none occurs."""
    size = len(tokens)
    if size < 2 or k < 1:
        return []
    last = tokens[-1]
    ends = [i for i in range(size - 2, -1, -1) if tokens[i] == last]  # earlier occurrences of the last token, latest first
    for n in range(min(longest, size - 1), shortest - 1, -1):
        suffix = tokens[size - n:]
        for end in ends:
            if end >= n - 1 and tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k]
    return []


def can_speculate(seq: Sequence) -> bool:
    """At its newest token (not replaying generated tokens after a preemption). Whatever stands between the logits
    and a row's choice is applied as at that row's position: penalties count the proposals before it, a grammar's
    mask comes from its matcher advanced through them (and rolled back), logit_bias, min_tokens, temperature,
    top-k, top-p, min-p and logprobs depend on the position at most."""
    return seq.num_computed == seq.num_tokens - 1


class SpeculationBudget:
    """Proposal rows per step. `step_seconds[r - 1]`: a decode step of r rows (r = 1 .. max_rows), measured;
    `draft_seconds[r - 1]`: a draft model's decode step of r rows (None: proposals cost nothing, as n-gram's).
    Without measurements (a tensor-parallel group), proposals fill the step up to max_rows.

    A step of B decode rows emits B tokens; with m proposal rows (m / k sequences proposing k each) it emits
    B + a * m in expectation, a being the fraction of proposals accepted lately, and costs
    step(B + m) + k * draft(m / k). The budget is the m with the most tokens per second, 0 when none beats plain
    decoding. The acceptance is a decaying average over verified proposals; while nothing is proposed it drifts
    back toward PRIOR, so a workload that turns repetitive is noticed again."""

    PRIOR = 0.5
    DECAY = 0.98     # weight of the past per verified draft, and per step without one
    WEIGHT = 4.0     # pseudo-proposals the prior counts for

    def __init__(self, config: SpeculativeConfig, step_seconds: list[float] | None = None,
                 draft_seconds: list[float] | None = None):
        self.config = config
        self.step_seconds = _nondecreasing(step_seconds)
        self.draft_seconds = _nondecreasing(draft_seconds)
        self.accepted, self.proposed = self.PRIOR * self.WEIGHT, self.WEIGHT

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed

    def rows(self, decoding: int) -> int:
        """Proposal rows for a step of `decoding` decode rows."""
        room = max(0, self.config.max_rows - decoding)
        if self.step_seconds is None or room == 0 or decoding == 0:
            return room
        k, a = self.config.num_speculative_tokens, self.acceptance
        best, best_rate = 0, decoding / self.step_seconds[decoding - 1]
        for m in range(1, room + 1):
            proposing = -(-m // k)  # sequences that propose
            if proposing > decoding:
                break
            cost = self.step_seconds[decoding + m - 1]
            if self.draft_seconds is not None:
                cost += min(k, m) * self.draft_seconds[proposing - 1]
            rate = (decoding + a * m) / cost
            if rate > best_rate:
                best, best_rate = m, rate
        return best

    def verified(self, proposed: int, accepted: int) -> None:
        self.accepted = self.DECAY * self.accepted + accepted
        self.proposed = self.DECAY * self.proposed + proposed

    def no_proposals(self) -> None:
        """A step that proposed nothing: the acceptance drifts back toward the prior."""
        self.accepted = self.DECAY * self.accepted + (1 - self.DECAY) * self.PRIOR * self.WEIGHT
        self.proposed = self.DECAY * self.proposed + (1 - self.DECAY) * self.WEIGHT


def _nondecreasing(seconds: list[float] | None) -> list[float] | None:
    """Measured times made non-decreasing in the rows (noise must not make a bigger step look cheaper)."""
    if seconds is None:
        return None
    out = []
    for t in seconds:
        out.append(max(t, out[-1]) if out else t)
    return out
