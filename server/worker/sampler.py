"""The batched sampler: one call turns a step's logits into one token per row.

Per row, in order: logit_bias; min_tokens (EOS and stop ids banned); repetition, frequency and presence
penalties; then greedy argmax (temperature 0), or temperature, top-k, top-p, min-p and a draw. Every step
is a tensor op over the whole batch; the only Python loops run over rows, to build small index lists and
to draw each seeded row's noise from its own generator. The call ends in one device-to-host transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.batch import to_device
from server.engine.sampling_params import SamplingParams
from server.worker.grammar_masks import MaskFiller


@dataclass
class SampleRow:
    """What the sampler needs to know about the sequence behind one row of the logits."""
    slot: int
    params: SamplingParams
    generator: torch.Generator | None = None   # from start_sequence; None: the sampler's shared generator
    num_generated: int = 0                     # output tokens so far, for min_tokens
    eos_token_ids: frozenset[int] = frozenset()
    matcher: Any = None                        # the sequence's grammar matcher, when its output is constrained
    preceding: tuple[int, ...] = ()            # a verify row's earlier proposals: tokens its position follows that
                                               # the slot's counts do not hold (penalties count them)
    counted: bool = True                       # add the chosen token to the slot's counts (a verify row's: no)


@dataclass
class SamplerOutput:
    """Python lists, one entry per row. Logprobs come from the raw model logits (see `Sampler.sample`)."""
    token_ids: list[int]
    logprobs: list[float]            # the chosen token's; nan where params.logprobs is None
    top_token_ids: list[list[int]]   # params.logprobs alternatives, most likely first; [] where None
    top_logprobs: list[list[float]]


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Penalties as vLLM and OpenAI define them; returns new logits.

    logits [B, V] float, output_counts [B, V] int, prompt_mask [B, V] bool, the penalties [B] float.
    The repetition penalty (CTRL's) covers prompt and output tokens: positive logits are divided by it,
    negative ones multiplied, so it always lowers a seen token. Frequency (× count) and presence (× 1)
    count only output tokens, as in OpenAI's definition.
    """
    in_output = output_counts > 0                                                    # [B, V]
    rep = repetition.unsqueeze(1)                                                    # [B, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(in_output | prompt_mask, penalised, logits)
    return logits - frequency.unsqueeze(1) * output_counts - presence.unsqueeze(1) * in_output


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                  min_p: torch.Tensor | None = None, max_top_k: int = 0) -> torch.Tensor:
    """Sets to -inf the tokens that top-k, then top-p, then min-p drop; returns new logits.

    logits [B, V] already divided by the temperature; each filter is [B] or None when no row uses it, and a
    row opts out with top_k 0, top_p 1, min_p 0. `max_top_k` is the largest top_k, known on the host, so
    no sync is needed to size `topk`. top-k keeps every token whose logit reaches the k-th largest (ties
    at the boundary are all kept); top-p keeps the smallest most-likely-first set whose probability
    (after top-k) reaches top_p, always at least the most likely token; min-p drops tokens whose
    probability is below min_p × the largest, which is a fixed gap in logits: l < l_max + log(min_p).
    """
    neg_inf = float("-inf")
    V = logits.shape[1]
    limited = None if top_k is None else (top_k > 0).unsqueeze(1)                   # [B, 1]
    kth_index = None if top_k is None else (top_k.clamp(1, V) - 1).unsqueeze(1)     # [B, 1]
    if top_p is not None:
        # Nucleus needs a full sort; top-k then comes free from the sorted values.
        # Not a stable sort (half the cost on CPU): among exactly equal logits at the nucleus boundary
        # which ones survive is unspecified, but it depends on the row alone.
        sorted_logits, order = logits.sort(dim=-1, descending=True)                  # [B, V] each
        if top_k is not None:
            kth = sorted_logits.gather(1, kth_index)                                 # [B, 1]
            sorted_logits = sorted_logits.masked_fill(limited & (sorted_logits < kth), neg_inf)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs           # probability of the strictly more likely tokens
        # Rows with top_p = 1 are exempt outright: float rounding in cumsum must not trim their tail.
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, neg_inf))  # back to vocab order
    elif top_k is not None:
        # top-k alone: a partial topk is much cheaper than sorting the whole vocabulary.
        largest = logits.topk(min(max_top_k, V), dim=-1).values                      # [B, K]
        kth = largest.gather(1, kth_index)                                           # [B, 1]
        logits = logits.masked_fill(limited & (logits < kth), neg_inf)
    if min_p is not None:
        threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)     # [B, 1]; log(0) = -inf
        logits = logits.masked_fill(logits < threshold, neg_inf)
    return logits


class Sampler:
    """Samples one token per row; owns the per-slot token statistics that penalties need.

    Counts of output tokens are updated inside `sample()` on the device (index_put, no sync), so the
    engine never has to report tokens back. Slots are assumed to hold one sequence each at a time.
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str = "cpu",
                 seed: int | None = None):
        self.num_slots, self.vocab_size = num_slots, vocab_size
        self.device = torch.device(device)
        # Allocated once; start_sequence resets a slot's rows and sample() adds to them in place.
        self.output_counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_mask = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=self.device)
        # Unseeded rows draw from this generator rather than torch's global one, so nothing else in the
        # process perturbs them and a test can fix `seed`.
        self.generator = torch.Generator(device=self.device)
        self._masks = None  # token bitmasks for constrained rows, made on first use
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def start_sequence(self, slot: int, prompt_ids: list[int], params: SamplingParams,
                       sample_index: int = 0, output_ids: Sequence[int] = ()) -> torch.Generator | None:
        """Prepares `slot` for a new sequence; returns its generator, or None when params.seed is None.

        With n > 1 the engine calls this once per sample with sample_index 0..n-1; sample i is seeded
        with (seed + i) mod 2**64 (as vLLM does), so every sample is reproducible and they differ. Note
        that sample 1 of seed s is then sample 0 of seed s + 1. `output_ids` restores the output counts
        of a sequence resumed after preemption; keep its old generator too, to continue its stream.
        """
        for ids in (prompt_ids, output_ids):
            if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size})")
        self.output_counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        # The mask is read only by penalties, so a request without them skips the host-to-device copy.
        if params.needs_penalties and prompt_ids:
            self.prompt_mask[slot, self._tensor(prompt_ids, torch.long)] = True
        if output_ids:
            ids = self._tensor(list(output_ids), torch.long)
            self.output_counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        if params.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed((params.seed + sample_index) % 2**64)

    def process_logits(self, logits: torch.Tensor, rows: list[SampleRow],
                       slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logit bias, min_tokens and penalties on `logits` [B, V], which may be modified in place; use the
        returned tensor.

        min_tokens bans params.stop_token_ids and, unless params.ignore_eos, the row's EOS ids. With
        ignore_eos an EOS does not end the sequence, so it cannot cut it short and need not be banned
        (vLLM does the same).
        """
        V = logits.shape[1]
        bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
        for i, row in enumerate(rows):
            p = row.params
            bias_rows += [i] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
            if row.num_generated < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids))
                ban_rows += [i] * len(banned)
                ban_ids += banned
        if any(not 0 <= t < V for t in bias_ids + ban_ids):
            raise ValueError(f"token id in logit_bias, stop_token_ids or EOS out of range [0, {V})")
        if bias_rows:
            index = (self._tensor(bias_rows, torch.long), self._tensor(bias_ids, torch.long))
            logits.index_put_(index, self._tensor(bias_values, torch.float32), accumulate=True)
        if ban_rows:
            logits[self._tensor(ban_rows, torch.long), self._tensor(ban_ids, torch.long)] = float("-inf")
        if any(row.params.needs_penalties for row in rows):
            if slots is None:
                slots = self._tensor([row.slot for row in rows], torch.long)
            penalties = self._tensor([[row.params.repetition_penalty, row.params.frequency_penalty,
                                       row.params.presence_penalty] for row in rows], torch.float32)  # [B, 3]
            counts = self.output_counts[slots]                                              # [B, V], a copy
            for i, row in enumerate(rows):
                if row.preceding and row.params.needs_penalties:
                    ids = self._tensor(list(row.preceding), torch.long)
                    counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
            logits = apply_penalties(logits, counts, self.prompt_mask[slots],
                                     penalties[:, 0], penalties[:, 1], penalties[:, 2])
        return logits

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        """One token per row of `logits` [B, V] (float32, one row per SampleRow); may modify `logits`.

        Logprobs are log_softmax of the raw logits, before bias, penalties, temperature and filtering,
        which is what vLLM returns by default. A seeded row's randomness comes only from its own
        generator, so its tokens do not depend on the other rows in the batch.
        """
        B, V = logits.shape
        if B != len(rows) or V != self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows × {self.vocab_size}")
        if B == 0:
            return SamplerOutput([], [], [], [])
        logits = logits.float()
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None        # [B, V]
        slots = self._tensor([row.slot for row in rows], torch.long)                # [B]
        logits = self.process_logits(logits, rows, slots)
        if any(row.matcher is not None for row in rows):  # grammars: disallowed tokens to -inf, their rows only
            if self._masks is None:
                self._masks = MaskFiller(V)
            self._masks.apply(logits, [row.matcher for row in rows])
        token_ids = self._choose(logits, rows)                                      # [B]
        if all(row.counted for row in rows):
            self.output_counts.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.int32),
                                          accumulate=True)
        else:
            counted = self._tensor([row.counted for row in rows], torch.bool)
            self.output_counts.index_put_((slots[counted], token_ids[counted]),
                                          torch.ones_like(token_ids[counted], dtype=torch.int32), accumulate=True)
        return self._to_host(token_ids, raw_logprobs, rows)

    def _choose(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        greedy = [row.params.greedy for row in rows]
        greedy_ids = logits.argmax(dim=-1) if any(greedy) else None  # first maximum: ties go to the lowest id
        if all(greedy):
            return greedy_ids
        sampled = [row.params for row, g in zip(rows, greedy) if not g]
        # Greedy rows ride along with neutral settings; their draw is discarded below.
        floats = self._tensor([[1.0, 1.0, 0.0] if g else [r.params.temperature, r.params.top_p, r.params.min_p]
                               for r, g in zip(rows, greedy)], torch.float32)  # [B, 3]: temperature, top_p, min_p
        logits = logits / floats[:, 0:1]
        top_k = None
        if any(p.top_k > 0 for p in sampled):
            top_k = self._tensor([0 if g else row.params.top_k for row, g in zip(rows, greedy)], torch.long)
        logits = filter_logits(logits, top_k,
                               floats[:, 1] if any(p.top_p < 1.0 for p in sampled) else None,
                               floats[:, 2] if any(p.min_p > 0.0 for p in sampled) else None,
                               max_top_k=max(p.top_k for p in sampled))
        # Exponential race: argmax(probs / q), q ~ Exp(1), draws token i with probability probs[i]; in logs
        # that is argmax(logits - log q), i.e. Gumbel-max, with no softmax needed.
        q = self._exponential_noise(logits, rows, greedy)                                       # [B, V]
        sampled_ids = (logits - q.log_()).argmax(dim=-1)
        return sampled_ids if greedy_ids is None else torch.where(self._tensor(greedy, torch.bool),
                                                                  greedy_ids, sampled_ids)

    def _exponential_noise(self, like: torch.Tensor, rows: list[SampleRow], greedy: list[bool]) -> torch.Tensor:
        q = torch.empty_like(like)                                                              # [B, V]
        seeded = [i for i, row in enumerate(rows) if row.generator is not None and not greedy[i]]
        if len(seeded) + sum(greedy) < len(rows):
            q.exponential_(generator=self.generator)    # one batched draw for all unseeded rows
        else:
            q.fill_(1.0)
        for i in seeded:
            # Exactly V draws from the row's own generator per sampled step, wherever the row sits.
            q[i].exponential_(generator=rows[i].generator)
        # exponential_ may return 0 (rarely); log(0) would turn a banned -inf logit into nan, which argmax
        # would pick.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    def count(self, slot: int, token_ids: list[int]) -> None:
        """Add tokens chosen outside `sample()`'s own counting (a speculating sequence's emitted tokens)."""
        ids = self._tensor(token_ids, torch.long)
        self.output_counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def redraw(self, generator: torch.Generator, state: torch.Tensor, rows: int) -> None:
        """Set a seeded sequence's generator to `state` and draw `rows` sampled rows' noise from it, as
        `_exponential_noise` draws one row's (a block of vocab-size float32 draws)."""
        generator.set_state(state)
        block = torch.empty(self.vocab_size, dtype=torch.float32, device=self.device)
        for _ in range(rows):
            block.exponential_(generator=generator)

    def _to_host(self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 rows: list[SampleRow]) -> SamplerOutput:
        B = len(rows)
        if raw_logprobs is None:
            empty = [[] for _ in range(B)]
            return SamplerOutput(token_ids.tolist(), [math.nan] * B, empty, [[] for _ in range(B)])
        ks = [row.params.logprobs for row in rows]
        K = min(max(k or 0 for k in ks), raw_logprobs.shape[1])
        top_values, top_ids = raw_logprobs.topk(K, dim=-1)                                      # [B, K] each
        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))                                 # [B, 1]
        # One transfer for everything; float64 holds both the token ids (< 2**53) and the float32 values.
        packed = torch.cat([token_ids.unsqueeze(1).double(), chosen.double(),
                            top_ids.double(), top_values.double()], dim=1).tolist()             # [B, 2 + 2K]
        out = SamplerOutput([], [], [], [])
        for row, k in zip(packed, ks):
            out.token_ids.append(int(row[0]))
            k = min(k, K) if k is not None else None
            out.logprobs.append(math.nan if k is None else row[1])
            out.top_token_ids.append([] if k is None else [int(t) for t in row[2:2 + k]])
            out.top_logprobs.append([] if k is None else row[2 + K:2 + K + k])
        return out

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, self.device, dtype)  # never waits for the device: the one sync is _to_host's
