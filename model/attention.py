"""Grouped-query attention over the preallocated KV cache: SDPA, and a plain reference path for tests.

The cache is paged (model/kv_cache.py): each sequence reads its keys and values through its block table.
Decode attention (one new token per sequence) is a custom op, `llama3::decode_attention`: it writes the new
keys and values into the cache and attends over each sequence's cached prefix. Being one opaque op, it can sit
inside a compiled decode step while the lengths it reads change every step. The query heads that share a KV
head are laid out as that head's query rows, so K/V are read once and never repeated per query head. One kernel
per device: on CPU a C kernel (model/kernels/decode_attention.c), on CUDA a Triton kernel
(model/triton_decode.py) that reads only device tensors, so a CUDA graph can capture it; each reads each
sequence's own tokens and nothing else. Without them (no C compiler, no Triton): SDPA over the batch's longest
prefix with a mask for the shorter ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import ForwardBatch, to_device
from model.config import ModelConfig
from model.kernels.cpu import decode_attention_kernel
from model.kernels.triton_decode import available as triton_available
from model.kernels.triton_decode import paged_decode_attention
from model.layers import row_parallel
from model.parallel import Shard
from model.rope import apply_rope

# "sdpa": the device's kernels (above); "reference": everything spelled out in float32; "triton": decode through
# the Triton kernel whatever the device (on CPU under TRITON_INTERPRET=1, for tests).
ATTENTION_IMPLS = ("sdpa", "reference", "triton")


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


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` rows held by `blocks` ([..., nb] ids into cache [blocks, Hkv, S, D]) as [..., Hkv, length, D],
    gathered (a copy)."""
    S = cache.shape[2]
    kv = cache[blocks]  # [..., nb, Hkv, S, D]
    kv = kv.transpose(-3, -4)  # [..., Hkv, nb, S, D]
    return kv.reshape(*kv.shape[:-3], kv.shape[-3] * S, kv.shape[-1])[..., :length, :]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, tables: torch.Tensor, host: torch.Tensor | None,
                      impl: str) -> torch.Tensor:
    """q [B, H, D], k and v [B, Hkv, D] of each row's newest token; `tables` [B, W]: each row's length (tokens to
    attend, the new one included), then its block table; `host` is the same on the CPU, read without a device
    sync (None where the caller runs the Triton kernel, which reads none). The new K/V are written at position
    length - 1 first. Rows with length 0 are padding: nothing is written for them and their output is zero."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if impl == "triton" or (impl == "sdpa" and q.device.type == "cuda" and triton_available("cuda")):
        return paged_decode_attention(q, k, v, k_cache, v_cache, tables)
    host = tables if host is None else host
    reference = impl == "reference"
    kernel = None if reference or q.device.type != "cpu" else decode_attention_kernel(q.dtype)
    if kernel is not None:  # writes the new rows and reads each sequence's own tokens, nothing else
        return kernel(q.view(B, Hkv, H // Hkv, D), k, v, k_cache, v_cache, host).view(B, H, D)

    rows = host.tolist()
    lengths = [r[0] for r in rows]
    n = B - lengths.count(0)
    if any(length == 0 for length in lengths[:n]):
        raise ValueError("padding rows of a decode batch must come last")
    out = torch.zeros_like(q)
    if n == 0:
        return out
    last = [((r[0] - 1) // S, (r[0] - 1) % S) for r in rows[:n]]
    blocks = to_device([rows[i][1 + j] for i, (j, _) in enumerate(last)], q.device)
    offsets = to_device([o for _, o in last], q.device)
    k_cache[blocks, :, offsets] = k[:n]  # two advanced indices around a slice: [n, Hkv, D]
    v_cache[blocks, :, offsets] = v[:n]
    queries = q[:n].view(n, Hkv, H // Hkv, D)  # the query heads of one KV head are its query rows
    L = max(lengths[:n])
    nb = -(-L // S)
    table = tables[:n, 1:1 + nb]  # [n, nb]
    keys, values = gather_blocks(k_cache, table, L), gather_blocks(v_cache, table, L)  # [n, Hkv, L, D]
    mask = (torch.arange(L, device=q.device) < tables[:n, :1])[:, None, None, :]  # [n, 1, 1, L]
    if reference:
        attended = reference_attention(queries.reshape(n * Hkv, 1, H // Hkv, D), keys.reshape(n * Hkv, 1, L, D),
                                       values.reshape(n * Hkv, 1, L, D), mask.repeat_interleave(Hkv, 0))
    else:
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)  # [n, Hkv, G, D]
    out[:n] = attended.reshape(n, H, D)
    return out


# A schema-defined op rather than `torch.library.custom_op`: its dispatch costs a few microseconds, not tens.
_library = torch.library.Library("llama3", "DEF")
_library.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                "Tensor tables, Tensor? host, str impl) -> Tensor")
_library.impl("decode_attention", _decode_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::decode_attention")
def _(q, k, v, k_cache, v_cache, tables, host, impl):
    return torch.empty_like(q)


def decode_attention(*args) -> torch.Tensor:
    """The op inside a compiled graph; the plain function in eager mode, which skips the op's dispatch."""
    if torch.compiler.is_compiling():
        return torch.ops.llama3.decode_attention.default(*args)
    return _decode_attention(*args)


class Attention(nn.Module):
    """`config`: this rank's heads (model.parallel.local_config); with `shard.split`, o_proj's partial sums are
    added over the ranks."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.split = shard.split
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_proj = None  # q, k and v fused into one packed layer, when they are packed (see model.quant.fuse)
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        N, B = x.shape[0], batch.num_decode
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                              self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(N, self.num_heads, self.head_dim), cos, sin)     # [N, H, D]
        k = apply_rope(k.view(N, self.num_kv_heads, self.head_dim), cos, sin)  # [N, Hkv, D]
        v = v.view(N, self.num_kv_heads, self.head_dim)
        if not batch.prefills:  # decode only: the shape a compiled step sees
            out = decode_attention(q, k, v, k_cache, v_cache, batch.decode_tables, batch.decode_host, self.impl)
            return row_parallel(self.o_proj, out.view(N, self.num_heads * self.head_dim), self.split)

        out = torch.empty_like(q)  # [N, H, D]
        if B:
            out[:B] = decode_attention(q[:B], k[:B], v[:B], k_cache, v_cache, batch.decode_tables,
                                       batch.decode_host, self.impl)
        # Prefill rows: one write for all of them, then each chunk attends over its blocks.
        k_cache[batch.write_blocks[B:], :, batch.write_rows[B:]] = k[B:]
        v_cache[batch.write_blocks[B:], :, batch.write_rows[B:]] = v[B:]
        attend = reference_attention if self.impl == "reference" else sdpa_attention
        for span in batch.prefills:
            if span.mask is None:  # a prompt's first chunk: its keys are this step's rows, nothing to gather
                keys = k[span.rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, T, D]
                values = v[span.rows].transpose(0, 1).unsqueeze(0)
            elif len(span.blocks) == 1:  # one block (a slot): a view
                keys = k_cache[span.blocks[0], :, :span.context_len].unsqueeze(0)  # [1, Hkv, L, D]
                values = v_cache[span.blocks[0], :, :span.context_len].unsqueeze(0)
            else:
                keys = gather_blocks(k_cache, span.block_ids, span.context_len).unsqueeze(0)
                values = gather_blocks(v_cache, span.block_ids, span.context_len).unsqueeze(0)
            queries = q[span.rows].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            out[span.rows] = attend(queries, keys, values, span.mask)[0].transpose(0, 1)
        return row_parallel(self.o_proj, out.view(N, self.num_heads * self.head_dim), self.split)
