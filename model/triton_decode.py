"""Decode attention over the paged KV cache as a Triton kernel: the CUDA path of `llama3::decode_attention`.

One program per (sequence, KV head). It writes the sequence's new key and value at row (length - 1) % S of its
block, then walks the tokens [0, length) through the block table, BLOCK_N at a time, with an online softmax:
the query heads that share the KV head are the rows of one small matrix product, so each key and value is read
once. It reads device tensors only (lengths and block tables included), never the host, and allocates nothing
but its output, so a CUDA graph can capture it. Rows of length 0 are padding: nothing is written, the output
is zero.

Under TRITON_INTERPRET=1 (set before Triton is imported) it runs on CPU tensors, which is how the tests check
it on machines without a GPU; there, bf16 operands are multiplied in float32 (the interpreter's bf16 product is
wrong), float16 and float32 run as on the GPU.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CUDA without Triton falls back to SDPA; the CPU never needs it
    triton = None

BLOCK_N = 64  # tokens per iteration: several cache blocks, gathered through the table


if triton is not None:
    @triton.jit
    def _paged_decode(Q, K, V, KC, VC, T, O,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                      stride_cb, stride_ch, stride_cs, stride_tb, stride_ob, stride_oh, scale,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                      BN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        table = T + b * stride_tb
        length = tl.load(table)  # tokens to attend, the new one included; 0: a padding row
        d = tl.arange(0, D)

        # The new token's key and value go to the cache first; the barrier makes them visible to every thread.
        pos = tl.maximum(length - 1, 0)
        block = tl.load(table + 1 + pos // S)
        dst = block * stride_cb + h * stride_ch + (pos % S) * stride_cs + d
        written = d < D * tl.minimum(length, 1)  # all of the head, or nothing for padding
        tl.store(KC + dst, tl.load(K + b * stride_kb + h * stride_kh + d), mask=written)
        tl.store(VC + dst, tl.load(V + b * stride_vb + h * stride_vh + d), mask=written)
        tl.debug_barrier()

        g = tl.arange(0, GP)  # query heads of this KV head, padded to a matrix-unit size
        heads = h * G + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)  # the softmax's denominator so far
        acc = tl.zeros([GP, D], tl.float32)
        n = tl.arange(0, BN)
        for start in range(0, length, BN):
            tok = start + n
            inside = tok < length
            blocks = tl.load(table + 1 + tok // S, mask=inside, other=0)
            rows = blocks * stride_cb + h * stride_ch + (tok % S) * stride_cs  # [BN]
            k = tl.load(KC + rows[:, None] + d[None, :], mask=inside[:, None], other=0.0)  # [BN, D]
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BN]
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(VC + rows[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # padding rows: 0 / 1
        o = O + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(O.dtype.element_ty), mask=g[:, None] < G)


@functools.cache
def available(device_type: str) -> bool:
    """Whether the kernel can run on this kind of device: CUDA with Triton, or any device under the interpreter."""
    if triton is None:
        return False
    if device_type == "cuda":
        return True
    from triton import knobs  # the interpreter flag, as Triton read it at import
    return bool(getattr(knobs.runtime, "interpret", False))


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """q [B, H, D], k and v [B, Hkv, D]; caches [blocks, Hkv, S, D]; tables [B, W] on the device: each row's
    length, then its block table. Writes the new K/V, returns the attention output [B, H, D]."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if D & (D - 1) or min(q.stride(-1), k.stride(-1), v.stride(-1), k_cache.stride(-1)) != 1:
        raise ValueError("the paged decode kernel needs a power-of-two head size and contiguous heads")
    G = H // Hkv
    # The interpreter's bf16 matrix product is wrong (Triton 3.9), so there bf16 operands are multiplied in float32.
    interpreted = q.device.type != "cuda"
    out = torch.empty_like(q)
    _paged_decode[(B, Hkv)](
        q, k, v, k_cache, v_cache, tables, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        D ** -0.5, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, S=S, BN=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32", UPCAST=interpreted and q.dtype == torch.bfloat16)
    return out
