"""The KV cache: every layer's keys and values, allocated once for a fixed number of sequence slots."""

from __future__ import annotations

import torch

from model.config import ModelConfig


class KVCache:
    """K and V as `[layers, slots, kv_heads, max_seq_len, head_dim]`; a sequence owns one slot for its life.

    Writes are index assignments at (slot, position); attention reads views of the live prefix. Nothing
    here is reallocated after construction.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_slots <= 0 or max_seq_len <= 0:
            raise ValueError(f"KV cache needs positive slots and length, got {num_slots} and {max_seq_len}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len, config.head_dim)
        # Zeroed, not just allocated: attention reads a slot's rows past its own length (masked out), and a
        # masked NaN still poisons the softmax. Fresh CPU memory is not reliably zero (seen in the test suite).
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]
