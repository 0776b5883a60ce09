"""The explicit batch one forward pass runs over: packed tokens of many sequences, each at its own position.

Chunks that decode (one generated token of a sequence) form the *decode group*: their attention is one batched
call over the cache rows of their slots, and quantised layers multiply them with their packed weights. Other
chunks (prompt tokens) each get their own attention call over a view of their slot. The caller lists decode
chunks first, so the decode group's tokens are the leading rows of the packed batch.
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
    decode: bool | None = None  # a generated token; None: any single-token chunk counts as one

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 if self.decode is None else self.decode


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
    logits_indices: torch.Tensor  # [M] rows whose logits the forward returns; the decode rows' come first
    num_decode: int               # leading rows that form the decode group
    decode_slots: torch.Tensor    # [num_decode] int64
    decode_lens: torch.Tensor     # [num_decode] int64, tokens each decode row attends to (itself included)
    decode_host: torch.Tensor     # [2, num_decode] int64 on the CPU: decode_slots and decode_lens again
    max_position: int             # known on the host, so bounds are checked without a device sync
    prefills: tuple[PrefillSpan, ...]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, chunks: list[SequenceChunk], device: torch.device | str = "cpu") -> ForwardBatch:
        if not chunks:
            raise ValueError("a batch needs at least one sequence chunk")
        if any(not c.token_ids for c in chunks):
            raise ValueError("every chunk needs at least one token")
        num_decode = 0
        while num_decode < len(chunks) and chunks[num_decode].is_decode:
            num_decode += 1
        if any(c.is_decode for c in chunks[num_decode:]):
            raise ValueError("decode chunks must come before the others")
        if any(len(c.token_ids) != 1 for c in chunks[:num_decode]):
            raise ValueError("a decode chunk has exactly one token")

        ids, positions, slots, logits_rows, prefills = [], [], [], [], []
        for c in chunks:
            row = len(ids)
            n = len(c.token_ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            slots.extend([c.slot] * n)
            logits_rows.extend(range(row, row + n) if c.all_logits else [row + n - 1])
            if not c.is_decode:
                mask = None
                if c.start:
                    q_pos = torch.arange(c.start, c.end, device=device)
                    mask = torch.arange(c.end, device=device)[None, :] <= q_pos[:, None]  # [T, end]
                prefills.append(PrefillSpan(slice(row, row + n), c.slot, c.end, mask))

        decode = chunks[:num_decode]
        host = torch.tensor([[c.slot for c in decode], [c.end for c in decode]], dtype=torch.long).view(2, -1)

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            input_ids=as_tensor(ids),
            positions=as_tensor(positions),
            slot_ids=as_tensor(slots),
            logits_indices=as_tensor(logits_rows),
            num_decode=num_decode,
            decode_slots=host[0].to(device),
            decode_lens=host[1].to(device),
            decode_host=host,
            max_position=max(c.end for c in chunks) - 1,
            prefills=tuple(prefills),
        )
