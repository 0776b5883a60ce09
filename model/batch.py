"""The explicit batch one forward pass runs over: packed tokens of many sequences, each at its own position.

Each chunk names the cache blocks that hold its sequence (its block table): token t sits in row t % block_size
of block blocks[t // block_size]. Without a block size, a sequence's one block holds all of it (a cache of
"slots": KVCache(config, num_slots, max_len) with chunk.blocks == (slot,)), which the model tests use.

Chunks that decode (one generated token of a sequence) form the *decode group*: their attention is one batched
call through their block tables. Other chunks (prompt tokens) each get their own attention call over their
blocks. The caller lists decode chunks first, so
the decode group's tokens are the leading rows of the packed batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device` without waiting for the device: on CUDA, an asynchronous copy (a plain
    `torch.tensor(values, device=...)` would first wait for every kernel already queued)."""
    return upload(torch.tensor(values, dtype=dtype), device)


def upload(host: torch.Tensor, device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """`host` copied to `device` (into `out` when given) asynchronously: from pinned memory, which the caching host
    allocator keeps until the copy is done (from pageable memory the driver may wait for the stream)."""
    if torch.device(device).type == "cpu":
        return host if out is None else out.copy_(host)
    pinned = host.contiguous().pin_memory()
    return pinned.to(device, non_blocking=True) if out is None else out.copy_(pinned, non_blocking=True)


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence for this step: they sit at positions [start, start + len(token_ids))."""

    slot: int                 # the sequence's block when `blocks` is not given (a cache of slots)
    start: int
    token_ids: list[int]
    all_logits: bool = False  # logits for every new token (prompt logprobs), not just the last
    decode: bool | None = None  # a generated token; None: any single-token chunk counts as one
    blocks: tuple[int, ...] = field(default=())  # the block table, covering at least [0, end)

    @property
    def table(self) -> tuple[int, ...]:
        return self.blocks or (self.slot,)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 if self.decode is None else self.decode


@dataclass(frozen=True)
class PrefillSpan:
    rows: slice            # rows of the packed batch
    blocks: tuple[int, ...]    # the blocks holding keys [0, context_len)
    block_ids: torch.Tensor | None  # the same on the device; None for a first chunk, which reads no cache
    context_len: int       # keys [0, context_len) of the sequence are attended
    mask: torch.Tensor | None  # [T, context_len] bool, None when plain causal (start == 0)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor       # [N] int64
    positions: torch.Tensor       # [N] int64
    num_decode: int               # leading rows that form the decode group
    decode_tables: torch.Tensor   # [num_decode, W] int64: tokens each decode row attends to (itself included),
    #                               then its block table (padded with 0)
    decode_host: torch.Tensor | None  # the same on the CPU, read by the attention op without a device sync
    #                               (None: the attention op reads no host table, as the Triton kernel)
    max_position: int | None      # known on the host, so bounds are checked without a device sync (None: the
    #                               caller has checked them, as a prepared decode step's runner does)
    prefills: tuple[PrefillSpan, ...] = ()
    # Where prompt rows (rows num_decode on) write their K/V, and which rows' logits are returned; None in a
    # decode-only batch, where every row writes through its decode table and returns its logits.
    write_blocks: torch.Tensor | None = None    # [N] int64, the cache block each token's K/V go to
    write_rows: torch.Tensor | None = None      # [N] int64, and the row within it
    logits_indices: torch.Tensor | None = None  # [M] rows whose logits the forward returns; decode rows first

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def decode(cls, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
               host: torch.Tensor | None) -> ForwardBatch:
        """A batch of decode rows only (one token per sequence), from tensors a prepared step keeps: each row
        attends and writes through its row of `tables`; positions were checked by the caller."""
        return cls(input_ids=input_ids, positions=positions, num_decode=input_ids.shape[0], decode_tables=tables,
                   decode_host=host, max_position=None)

    @classmethod
    def build(cls, chunks: list[SequenceChunk], device: torch.device | str = "cpu",
              block_size: int | None = None) -> ForwardBatch:
        """`block_size` None: each chunk's sequence sits in one block (its slot), row = position."""
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

        def used(c: SequenceChunk, num_tokens: int) -> tuple[int, ...]:
            table = c.table
            needed = 1 if block_size is None else -(-num_tokens // block_size)
            if len(table) < needed:
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {num_tokens} tokens")
            return table[:needed]

        ids, positions, blocks, rows, logits_rows, prefills = [], [], [], [], [], []
        for c in chunks:
            row = len(ids)
            n = len(c.token_ids)
            table = used(c, c.end)
            ids.extend(c.token_ids)
            positions.extend(range(c.start, c.end))
            for p in range(c.start, c.end):
                blocks.append(table[0] if block_size is None else table[p // block_size])
                rows.append(p if block_size is None else p % block_size)
            logits_rows.extend(range(row, row + n) if c.all_logits else [row + n - 1])
            if not c.is_decode:
                mask = None
                if c.start:
                    q_pos = torch.arange(c.start, c.end, device=device)
                    mask = torch.arange(c.end, device=device)[None, :] <= q_pos[:, None]  # [T, end]
                block_ids = to_device(table, device) if c.start else None
                prefills.append(PrefillSpan(slice(row, row + n), table, block_ids, c.end, mask))

        decode = [(c.end, *used(c, c.end)) for c in chunks[:num_decode]]
        width = max((len(d) for d in decode), default=1)
        host = torch.tensor([d + (0,) * (width - len(d)) for d in decode], dtype=torch.long).view(-1, width)
        return cls(
            input_ids=to_device(ids, device),
            positions=to_device(positions, device),
            write_blocks=to_device(blocks, device),
            write_rows=to_device(rows, device),
            logits_indices=to_device(logits_rows, device),
            num_decode=num_decode,
            decode_tables=upload(host, device),
            decode_host=host,
            max_position=max(c.end for c in chunks) - 1,
            prefills=tuple(prefills),
        )
