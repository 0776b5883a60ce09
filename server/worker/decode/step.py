"""The decode step's contract: a decode-only forward pass prepared once at start-up, then run every step.

`prepare()` builds it (False, with one log line, when it cannot: the runner then decodes eagerly); `size_for(n)`
is the smallest prepared batch size that holds n rows; `run()` takes the rows (token, position, block table) and
returns their logits. A batch runs at its prepared size, padded with rows of length 0, for which the attention op
writes and reads nothing. Two implementations: `CompiledDecode` (CPU, Inductor) and `CapturedDecode` (CUDA graphs).
"""

from __future__ import annotations

import bisect

import torch

from model.batch import ForwardBatch
from model.kv_cache import KVCache
from model.llama import Llama


def decode_table(token_ids: list[int], positions: list[int], tables: list[tuple[int, ...]], size: int,
                 block_size: int) -> torch.Tensor:
    """[size, 3 + W] int64 on the host, a row per sequence: token, position, length (position + 1), then the W
    blocks its tokens cover (the longest row's count; shorter rows end in zeros). Rows past len(token_ids) are
    zeros: padding, length 0. Built in one conversion, not one per row."""
    counts = [p // block_size + 1 for p in positions]
    width = 3 + max(counts, default=1)
    rows = [[token, position, position + 1, *table[:count]] + [0] * (width - 3 - count)
            for token, position, table, count in zip(token_ids, positions, tables, counts)]
    return torch.tensor(rows + [[0] * width] * (size - len(rows)), dtype=torch.long)


class DecodeStep:
    """What both prepared steps share: the model and cache, the ladder of batch sizes, the forward they run."""

    def __init__(self, model: Llama, cache: KVCache, max_batch: int, device: torch.device, sizes: list[int]):
        self.model, self.cache, self.device = model, cache, device
        self.max_batch = max_batch
        self.sizes = sorted(sizes)

    def prepare(self) -> bool:
        raise NotImplementedError

    def size_for(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, token_ids: list[int], positions: list[int], tables: list[tuple[int, ...]]) -> torch.Tensor:
        """Logits [n, vocab] (float32) of n decode rows: token i at positions[i] of the sequence whose blocks are
        tables[i]. The result may be a view of a buffer the next step overwrites: use it before then."""
        n = len(token_ids)
        size = self.size_for(n)
        if size is None:
            raise ValueError(f"a prepared decode step holds at most {self.max_batch} rows, got {n}")
        return self._launch(size, decode_table(token_ids, positions, tables, size, self.cache.block_size))[:n]

    def _launch(self, size: int, rows: torch.Tensor) -> torch.Tensor:
        """Logits [size, vocab] of the rows of `decode_table` (padding included)."""
        raise NotImplementedError

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                 host: torch.Tensor | None) -> torch.Tensor:
        """The traced or captured function: the model over a decode-only batch."""
        return self.model.run(ForwardBatch.decode(input_ids, positions, tables, host), self.cache)
