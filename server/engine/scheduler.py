"""Who runs this step: continuous batching over a paged KV cache, with chunked prefill and preemption.

Every step, running sequences come first (decodes, oldest first, then unfinished prefills), then waiting
sequences are admitted first come, first served while sequence slots, cache blocks and the token budget last.
Blocks are taken as tokens need them. When a decode needs a block and none is left, the newest running sequence
is preempted: its blocks are released and it goes back to the head of the queue, to be recomputed later (its
full blocks usually still cached). A resumed sequence prefills its prompt and then replays its generated tokens
one per step as decodes, so each token's arithmetic is what it was the first time and its output is unchanged.

Prefix caching: full blocks are cached by their tokens and everything before them (server/block_pool.py). A new
sequence maps the leading blocks of its tokens onto cached ones and computes only the rest; samples after the
first of an `n > 1` request wait for the first one's prompt and share its blocks the same way.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_pool import ROOT, BlockPool
from server.engine.exceptions import EngineOverloaded
from server.engine.sequence import Sequence, Status
from server.engine.speculation import SpeculationBudget, SpeculativeConfig, can_speculate, propose


@dataclass
class ScheduledChunk:
    seq: Sequence
    token_ids: list[int]
    start: int                    # position of the first token
    samples: bool                 # the chunk reaches the sequence's end, so its last logits are sampled
    proposed: int = 0             # speculative proposals after the sequence's newest token (token_ids[1:])
    drafts: int = 0               # proposals a draft model is to make before the step (blocks held for them); it
                                  # appends them to token_ids and sets `proposed` (server/worker/draft.py)
    verified: list[int] | None = None  # with proposals: each row's choice (greedy or sampled), filled by the runner
    verified_logprobs: list | None = None  # and each row's TokenLogprob, when the request asks for logprobs

    @property
    def decode(self) -> bool:
        """One generated token; prompt tokens never are, however they are chunked, so a token's arithmetic
        (packed or dense weights) never depends on what else is in the batch."""
        return self.start >= self.seq.num_prompt


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk]                            # decode chunks first
    admitted: list[Sequence] = field(default_factory=list)  # took a sequence slot this step
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks this step


class Scheduler:
    def __init__(self, num_slots: int, blocks: BlockPool, max_num_batched_tokens: int, max_waiting: int,
                 prefix_caching: bool = True, max_waiting_tokens: int | None = None,
                 speculation: SpeculativeConfig | None = None, max_model_len: int | None = None,
                 budget: SpeculationBudget | None = None):
        self.speculation = speculation
        # proposal rows per step (measured costs and acceptance); None: up to max_rows decode rows
        self.budget = budget if budget is not None or speculation is None else SpeculationBudget(speculation)
        self.max_model_len = max_model_len
        self.free_slots = list(range(num_slots))  # a min-heap of sequence slots (the sampler's rows)
        self.blocks = blocks
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0
        self.num_preemptions = 0
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_waiting_tokens = max_waiting_tokens  # prompt tokens queued (None: no bound)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []             # in admission order: the newest is preempted first

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
        batch = ScheduledBatch(chunks=[])
        while True:
            self._schedule_into(batch)
            if batch.chunks or not self.running:
                break
            # Every running sequence is a prefill that cannot get a block: make room by preempting the newest.
            self._preempt(self.running[-1], batch)
        # Decode chunks first (the model's decode group), then in slot order.
        batch.chunks.sort(key=lambda c: (not c.decode, c.seq.slot))
        return batch

    def _schedule_into(self, batch: ScheduledBatch) -> None:
        budget = self.max_num_batched_tokens
        decoding = [seq for seq in self.running if seq.num_computed >= seq.num_prompt]
        spare = 0 if self.budget is None else self.budget.rows(len(decoding))  # proposal rows this step
        for seq in decoding:  # decodes (or replays of generated tokens): one token each, oldest first
            if seq.status is Status.RUNNING and budget > 0:
                if self._grow(seq, seq.num_computed + 1, batch):
                    chunk = self._speculate(seq, min(spare, budget - 1)) if spare else self._chunk(seq, 1)
                    batch.chunks.append(chunk)
                    budget -= len(chunk.token_ids) + chunk.drafts
                    spare -= chunk.proposed + chunk.drafts
        for seq in self.running:  # prefills under way, as far as blocks allow
            if seq.num_computed < seq.num_prompt and budget > 0:
                n = self._fit(seq, min(budget, seq.num_prompt - seq.num_computed))
                if n:
                    batch.chunks.append(self._chunk(seq, n))
                    budget -= n
        if batch.preempted:
            return  # blocks are short: admit nobody this step (the preempted would only be preempted again)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.parent is not None:
                if seq.num_prompt < 2 or seq.parent.status is not Status.RUNNING:
                    seq.parent = None  # nothing to share, or the parent has ended: prefill on our own
                elif seq.parent.num_computed < seq.num_prompt - 1:
                    break  # first come, first served: wait behind the parent's prefill, then share its blocks
            if seq.slot is None and not self.free_slots:
                break
            if not self._admit(seq, budget, batch):
                break
            budget -= len(batch.chunks[-1].token_ids)

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> bool:
        """Map the sequence's cached prefix, take blocks for its first chunk and a slot; False (and nothing
        taken) when the blocks are not there."""
        hits = self._prefix_hits(seq)
        computed = len(hits) * self.blocks.block_size
        tokens = 1 if computed >= seq.num_prompt else min(budget, seq.num_prompt - computed)
        held = sum(1 for entry in hits if not self.blocks.holders(entry.block))  # cached, about to be held
        if self.blocks.blocks_for(computed + tokens) - len(hits) > self.blocks.num_available - held:
            return False
        self.waiting.popleft()
        for entry in hits:
            self.blocks.acquire(entry.block)
            seq.block_table.append(entry.block)
            seq.block_uids.append(entry.uid)
        seq.num_computed = computed
        self.prefix_hit_tokens += computed
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = computed
        self._grow(seq, computed + tokens, batch)
        if seq.slot is None:
            seq.slot = heapq.heappop(self.free_slots)
            batch.admitted.append(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        batch.chunks.append(self._chunk(seq, tokens))
        return True

    def _prefix_hits(self, seq: Sequence):
        """Cached blocks holding the sequence's leading tokens; at least its last token is always computed (its
        logits give the next sample). Sequences that want prompt logprobs compute their whole prompt."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        return self.blocks.lookup(seq.all_tokens(), (seq.num_tokens - 1) // self.blocks.block_size)

    def _grow(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for `num_tokens` tokens, preempting the newest running sequences while none are free; False
        when `seq` itself was the newest and has been preempted."""
        while len(seq.block_table) < self.blocks.blocks_for(num_tokens):
            if self.blocks.num_available == 0:
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    return False
                continue
            seq.block_table.append(self.blocks.allocate())
        return True

    def _fit(self, seq: Sequence, wanted: int) -> int:
        """How many of `wanted` prefill tokens fit in the sequence's blocks plus those available (taken now)."""
        size = self.blocks.block_size
        room = (len(seq.block_table) + self.blocks.num_available) * size - seq.num_computed
        n = max(0, min(wanted, room))
        while len(seq.block_table) < self.blocks.blocks_for(seq.num_computed + n):
            seq.block_table.append(self.blocks.allocate())
        return n

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Release the sequence's blocks and queue it first, to be recomputed; it keeps its slot (sampler state)."""
        self._release_blocks(seq)
        seq.num_computed = seq.num_draft_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the tail is reused first, the prefix stays cached longest
            self.blocks.release(block)
        seq.block_table = []
        seq.block_uids = []

    def _speculate(self, seq: Sequence, room: int) -> ScheduledChunk:
        """The sequence's decode chunk with up to `room` speculative tokens after its newest one, within its limits
        (output left, context) and the free blocks (proposals never preempt anyone); blocks for them are taken.
        n-gram proposals are made here; a draft model's are left to make (`drafts`)."""
        spec = self.speculation
        k = min(spec.num_speculative_tokens, room, seq.max_tokens - len(seq.output_ids) - 1)
        if self.max_model_len is not None:
            k = min(k, self.max_model_len - seq.num_tokens)
        if k <= 0 or not can_speculate(seq):
            return self._chunk(seq, 1)
        if spec.method == "draft_model":
            chunk = self._chunk(seq, 1)
            chunk.drafts = self._fit(seq, 1 + k) - 1  # the newest token's block is already held
            return chunk
        proposals = propose(seq.all_tokens(), k, spec.prompt_lookup_max, spec.prompt_lookup_min)
        if proposals:
            proposals = proposals[:self._fit(seq, 1 + len(proposals)) - 1]
        return self._chunk(seq, 1, proposals)

    @staticmethod
    def _chunk(seq: Sequence, n: int, proposals: list[int] | None = None) -> ScheduledChunk:
        """The next n tokens; a prefill chunk stops at the prompt's end (generated tokens are replayed as decodes).
        Proposals follow a decode's token, to be verified in the same step."""
        tokens = seq.tokens(seq.num_computed, seq.num_computed + n)
        if proposals:
            return ScheduledChunk(seq, tokens + proposals, seq.num_computed, True, proposed=len(proposals))
        return ScheduledChunk(seq, tokens, seq.num_computed, seq.num_computed + n == seq.num_tokens)

    def computed(self, seq: Sequence, n: int) -> None:
        """After a step: n more of the sequence's tokens are in the cache; newly full blocks are cached."""
        seq.num_computed += n
        if not self.prefix_caching:
            return
        size = self.blocks.block_size
        while (len(seq.block_uids) + 1) * size <= seq.num_computed:
            i = len(seq.block_uids)
            parent = seq.block_uids[-1] if seq.block_uids else ROOT
            seq.block_uids.append(self.blocks.register(seq.block_table[i], parent, seq.tokens(i * size,
                                                                                               (i + 1) * size)))

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks and slot, whether it finished, was aborted or failed; safe to call twice."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq)
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)
