"""The KV cache: every layer's keys and values in one pool of fixed-size blocks, allocated once at start-up."""

from __future__ import annotations

import math

import numpy as np
import torch

from model.config import ModelConfig


class KVCache:
    """K and V as `[layers, blocks, kv_heads, block_size, head_dim]`. A sequence's token t lives in row
    t % block_size of block table[t // block_size], where `table` is the block table the scheduler keeps for it.

    Writes are index assignments at (block, row); attention reads through block tables. Nothing here is
    reallocated after construction.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs positive blocks and block size, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_hidden_layers, num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        # Zeroed, not just allocated: a masked NaN in rows attention gathers but ignores still poisons a softmax.
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros that cost memory only as they are written, on the CPU: calloc's large blocks are fresh pages that the
    OS zeroes when first touched, whereas torch.zeros writes every page at start-up (a cache sized for 16
    sequences of 4,096 tokens would be resident before the first request)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
