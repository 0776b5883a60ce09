"""Who runs this step: continuous batching over a fixed pool of KV cache slots, with chunked prefill.

Every step, running sequences come first (decodes, then unfinished prefills), then waiting sequences are
admitted first come, first served while slots and the token budget last. A running sequence is never
preempted, so new arrivals cannot starve it.
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


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk]                                      # single-token chunks first
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, tokens) to fork
    admitted: list[Sequence] = field(default_factory=list)            # took a slot this step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int, max_waiting: int):
        self.free_slots = list(range(num_slots))  # a min-heap: the lowest free slot is reused first
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seqs: list[Sequence]) -> None:
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloaded(f"the server is overloaded: {len(self.waiting)} requests are waiting")
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
            seq.slot = heapq.heappop(self.free_slots)
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
        # Single-token chunks first (the model's decode group), in slot order: the lowest free slot is always
        # taken, so running sequences tend to hold consecutive slots, which attention reads without a gather.
        batch.chunks.sort(key=lambda c: (len(c.token_ids) > 1, c.seq.slot))
        return batch

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
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)
