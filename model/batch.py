"""The explicit batch one forward pass runs over: packed tokens of many sequences, each at its own position.

Sequences whose chunk is a single token (decoding, or a one-token prompt) form the *decode group*: their
attention is one batched SDPA call over the cache rows of their slots. Longer chunks (prefill) each get
their own call over a view of their slot. The caller lists decode chunks first, so the decode group's
tokens are the leading rows of the packed batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence for this step: they sit at positions [start, start + len(token_ids))."""

    slot: int
    start: int
    token_ids: list[int]
    all_logits: bool = False  # logits for every new token (prompt logprobs), not just the last

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class PrefillSpan:
    rows: slice            # rows of the packed batch
    slot: int
    context_len: int       # keys [0, context_len) of the slot are attended
    mask: torch.Tensor | None  # [T, context_len] bool, None when plain causal (start == 0)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor       # [N] int64
    positions: torch.Tensor       # [N] int64
    slot_ids: torch.Tensor        # [N] int64, the cache slot each token writes to
    logits_indices: torch.Tensor  # [M] rows whose logits the forward returns
    num_decode: int               # leading rows that form the decode group
    decode_slots: torch.Tensor    # [num_decode] int64
    decode_slot_range: tuple[int, int] | None  # (first, end) when those slots are consecutive: read a view, no gather
    decode_mask: torch.Tensor     # [num_decode, 1, 1, decode_len] bool
    decode_len: int               # longest context in the decode group
    max_position: int             # known on the host, so bounds are checked without a device sync
    prefills: tuple[PrefillSpan, ...]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, chunks: list[SequenceChunk], device: torch.device | str = "cpu") -> ForwardBatch:
        if not chunks:
            raise ValueError("a batch needs at least one sequence chunk")
        num_decode = 0
        while num_decode < len(chunks) and len(chunks[num_decode].token_ids) == 1:
            num_decode += 1
        if any(len(c.token_ids) == 1 for c in chunks[num_decode:]):
            raise ValueError("single-token chunks must come before longer ones")
        if any(not c.token_ids for c in chunks):
            raise ValueError("every chunk needs at least one token")

        ids, positions, slots, logits_rows, prefills = [], [], [], [], []
        for c in chunks:
            row = len(ids)
            n = len(c.token_ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            slots.extend([c.slot] * n)
            logits_rows.extend(range(row, row + n) if c.all_logits else [row + n - 1])
            if n > 1:
                mask = None
                if c.start:
                    q_pos = torch.arange(c.start, c.end, device=device)
                    mask = torch.arange(c.end, device=device)[None, :] <= q_pos[:, None]  # [T, end]
                prefills.append(PrefillSpan(slice(row, row + n), c.slot, c.end, mask))

        decode = chunks[:num_decode]
        decode_slot_list = [c.slot for c in decode]
        consecutive = decode_slot_list == list(range(decode_slot_list[0], decode_slot_list[0] + num_decode)) \
            if decode else False
        decode_len = max((c.end for c in decode), default=0)
        ctx = torch.tensor([c.end for c in decode], dtype=torch.long, device=device)
        decode_mask = torch.arange(decode_len, device=device)[None, :] < ctx[:, None]  # [B, L]

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            input_ids=as_tensor(ids),
            positions=as_tensor(positions),
            slot_ids=as_tensor(slots),
            logits_indices=as_tensor(logits_rows),
            num_decode=num_decode,
            decode_slots=as_tensor(decode_slot_list),
            decode_slot_range=(decode_slot_list[0], decode_slot_list[0] + num_decode) if consecutive else None,
            decode_mask=decode_mask[:, None, None, :],
            decode_len=decode_len,
            max_position=max(c.end for c in chunks) - 1,
            prefills=tuple(prefills),
        )
