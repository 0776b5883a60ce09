"""Who runs this step: continuous batching over a fixed pool of KV cache slots, with chunked prefill.

Every step, running sequences come first (decodes, then unfinished prefills), then waiting sequences are
admitted first come, first served while slots and the token budget last. A running sequence is never
preempted, so new arrivals cannot starve it.

Prefix reuse: a freed slot keeps the K/V of the tokens its last sequence computed. A new sequence whose prompt
starts with those tokens (a shared system prompt, a conversation's earlier turns) takes that slot and prefills
only the rest.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from server.sequence import Sequence, Status


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the server answers 503."""


@dataclass
class ScheduledChunk:
    seq: Sequence
    token_ids: list[int]
    start: int                    # position of the first token
    samples: bool                 # the chunk reaches the sequence's end, so its last logits are sampled

    @property
    def decode(self) -> bool:
        """One generated token; prompt tokens never are, however they are chunked, so a token's arithmetic
        (packed or dense weights) never depends on what else is in the batch."""
        return self.start >= self.seq.num_prompt


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk]                                      # decode chunks first
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, tokens) to fork
    admitted: list[Sequence] = field(default_factory=list)            # took a slot this step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


# Below this many shared tokens a slot is not worth choosing over the lowest free one, which keeps running
# sequences in consecutive slots (read by attention without a gather).
MIN_PREFIX_REUSE = 16


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int, max_waiting: int, prefix_reuse: bool = True,
                 max_waiting_tokens: int | None = None):
        self.free_slots = list(range(num_slots))  # a min-heap: the lowest free slot is reused first
        self.slot_tokens: list[list[int]] = [[] for _ in range(num_slots)]  # what a free slot's K/V still hold
        self.prefix_reuse = prefix_reuse
        self.prefix_hit_tokens = 0
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_waiting_tokens = max_waiting_tokens  # prompt tokens queued (None: no bound)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seqs: list[Sequence]) -> None:
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloaded(f"the server is overloaded: {len(self.waiting)} requests are waiting")
        if self.max_waiting_tokens is not None:
            queued = sum(s.num_prompt for s in self.waiting)
            # A request alone in the queue is always let in: the prompt length itself is bounded by max_model_len.
            if queued and queued + sum(s.num_prompt for s in seqs[:1]) > self.max_waiting_tokens:
                raise EngineOverloaded(f"the server is overloaded: {queued} prompt tokens are waiting")
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch(chunks=[])
        for seq in self.running:  # decodes: one token each, always scheduled
            if seq.num_computed >= seq.num_prompt:
                batch.chunks.append(self._chunk(seq, seq.uncomputed()))
                budget -= 1
        for seq in self.running:  # prefills under way
            if seq.num_computed < seq.num_prompt and budget > 0:
                tokens = seq.uncomputed()[:budget]
                batch.chunks.append(self._chunk(seq, tokens))
                budget -= len(tokens)
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting[0]
            if seq.parent is not None:
                if seq.num_prompt < 2 or seq.parent.status is not Status.RUNNING:
                    seq.parent = None  # nothing to share, or the parent has ended: prefill on our own
                elif seq.parent.num_computed < seq.num_prompt - 1:
                    break  # first come, first served: wait behind the parent's prefill
            self.waiting.popleft()
            seq.slot = self._take_slot(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.admitted.append(seq)
            if seq.parent is not None:
                # Copy every prompt token but the last; the last is recomputed so this sample draws its own token.
                shared = seq.num_prompt - 1
                batch.copies.append((seq.parent.slot, seq.slot, shared))
                seq.num_computed = shared
            tokens = seq.uncomputed()[:budget]
            batch.chunks.append(self._chunk(seq, tokens))
            budget -= len(tokens)
        # Decode chunks first (the model's decode group), in slot order: the lowest free slot is always taken,
        # so running sequences tend to hold consecutive slots, which attention reads without a gather.
        batch.chunks.sort(key=lambda c: (not c.decode, c.seq.slot))
        return batch

    def _take_slot(self, seq: Sequence) -> int:
        """The free slot holding the longest prefix of the prompt, if long enough; else the lowest free slot.

        At least the prompt's last token is always recomputed, since its logits give the first sample.
        Sequences that want prompt logprobs, or fork from a sibling, prefill in full."""
        best, best_len = None, MIN_PREFIX_REUSE - 1
        if self.prefix_reuse and seq.parent is None and seq.params.prompt_logprobs is None:
            for slot in self.free_slots:
                cached = self.slot_tokens[slot]
                if cached and cached[0] == seq.prompt_ids[0]:
                    n = common_prefix(cached, seq.prompt_ids, seq.num_prompt - 1)
                    if n > best_len:
                        best, best_len = slot, n
        if best is None:
            slot = heapq.heappop(self.free_slots)
        else:
            slot = best
            self.free_slots.remove(slot)
            heapq.heapify(self.free_slots)
            seq.num_computed = best_len
            self.prefix_hit_tokens += best_len
        self.slot_tokens[slot] = []  # the new occupant overwrites it from here on
        return slot

    @staticmethod
    def _chunk(seq: Sequence, tokens: list[int]) -> ScheduledChunk:
        return ScheduledChunk(seq, tokens, seq.num_computed, seq.num_computed + len(tokens) == seq.num_tokens)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's slot, whether it finished, was aborted or failed; safe to call twice."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.slot_tokens[seq.slot] = (seq.prompt_ids + seq.output_ids)[:seq.num_computed]
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)
