"""Grouped-query attention over the preallocated KV cache: SDPA, and a plain reference path for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import ForwardBatch
from model.config import ModelConfig
from model.rope import apply_rope

ATTENTION_IMPLS = ("sdpa", "reference")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores, mask, softmax, weighted sum, spelled out. q [B, H, T, D]; k, v [B, Hkv, L, D]; mask [.., T, L]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [B, H, L, D]
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, T, L]
    if mask is None:  # causal, queries aligned with the first keys
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        attend = sdpa_attention if self.impl == "sdpa" else reference_attention
        q = apply_rope(self.q_proj(x).view(N, self.num_heads, self.head_dim), cos, sin)     # [N, H, D]
        k = apply_rope(self.k_proj(x).view(N, self.num_kv_heads, self.head_dim), cos, sin)  # [N, Hkv, D]
        v = self.v_proj(x).view(N, self.num_kv_heads, self.head_dim)
        # Two advanced indices around a slice: the indexed view is [N, Hkv, D], one write per token.
        k_cache[batch.slot_ids, :, batch.positions] = k
        v_cache[batch.slot_ids, :, batch.positions] = v

        out = torch.empty_like(q)  # [N, H, D]
        B = batch.num_decode
        if B:
            L = batch.decode_len
            if batch.decode_slot_range is not None:  # a view of consecutive slots
                first, end = batch.decode_slot_range
                keys, values = k_cache[first:end, :, :L], v_cache[first:end, :, :L]  # [B, Hkv, L, D]
            else:  # a gather: copies the live prefix of each slot
                keys = k_cache[batch.decode_slots, :, :L]  # [B, Hkv, L, D]
                values = v_cache[batch.decode_slots, :, :L]
            out[:B] = attend(q[:B].unsqueeze(2), keys, values, batch.decode_mask).squeeze(2)
        for span in batch.prefills:
            keys = k_cache[span.slot, :, : span.context_len].unsqueeze(0)  # [1, Hkv, L, D], a view
            values = v_cache[span.slot, :, : span.context_len].unsqueeze(0)
            queries = q[span.rows].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            out[span.rows] = attend(queries, keys, values, span.mask)[0].transpose(0, 1)
        return self.o_proj(out.view(N, self.num_heads * self.head_dim))
