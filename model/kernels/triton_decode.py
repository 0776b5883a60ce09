"""Decode attention over the paged KV cache as a Triton kernel: the CUDA path of `llama3::decode_attention`.

A first kernel writes every row's new key and value at row (length - 1) % S of its block, one program per (row, KV
head); the attention kernel runs after it, so rows of one sequence at successive positions in one call (a
speculative step's verify rows) each see the new tokens of the rows before them, exactly as one call per
position would. Attention runs one program per (sequence, KV head, split): the tokens a sequence may hold are cut
into splits of a fixed size (flash-decoding), so a small batch still spreads over the GPU's multiprocessors.
Each program walks its tokens through
the block table, BLOCK_N at a time, with an online softmax: the query heads that share the KV head are the rows
of one small matrix product, so each key and value is read once. A second kernel merges the splits' partial
results by their maxima and denominators. The split size depends only on the width of the block table (the
longest sequence the step may hold), never on the batch, so a sequence's arithmetic does not depend on what it is
batched with. Lengths and block tables are read on the device only, never from the host, and nothing is
allocated but the output and the partial results, so a CUDA graph can capture the kernels. Rows of length 0 are
padding: nothing is written, the output is zero.

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

BLOCK_N = 64      # tokens per iteration: several cache blocks, gathered through the table
MIN_SPLIT = 128   # tokens per split at least; more when a sequence may hold more than MAX_SPLITS of them
MAX_SPLITS = 32


if triton is not None:
    @triton.jit
    def _write_new_kv(K, V, KC, VC, T, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_ch, stride_cs,
                      stride_tb, D: tl.constexpr, S: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        table = T + b * stride_tb
        length = tl.load(table).to(tl.int32)  # 0: a padding row, which writes nothing
        pos = tl.maximum(length - 1, 0)
        block = tl.load(table + 1 + pos // S)
        d = tl.arange(0, D)
        dst = block * stride_cb + h * stride_ch + (pos % S) * stride_cs + d
        written = d < D * (length > 0).to(tl.int32)  # all of the head, or nothing
        tl.store(KC + dst, tl.load(K + b * stride_kb + h * stride_kh + d), mask=written)
        tl.store(VC + dst, tl.load(V + b * stride_vb + h * stride_vh + d), mask=written)

    @triton.jit
    def _paged_decode(Q, KC, VC, T, O, PO, PML, stride_qb, stride_qh, stride_cb, stride_ch, stride_cs, stride_tb,
                      stride_ob, stride_oh, scale,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BN: tl.constexpr,
                      SPLIT: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        table = T + b * stride_tb
        length = tl.load(table).to(tl.int32)  # tokens to attend, the new one included; 0: a padding row
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, length)
        d = tl.arange(0, D)

        g = tl.arange(0, GP)  # query heads of this KV head, padded to a matrix-unit size
        heads = h * G + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)  # the softmax's denominator so far
        acc = tl.zeros([GP, D], tl.float32)
        n = tl.arange(0, BN)
        for start in range(lo, hi, BN):
            tok = start + n
            inside = tok < hi
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
        valid = g[:, None] < G
        if SPLITS == 1:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]  # padding rows: 0 / 1
            o = O + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(o, out.to(O.dtype.element_ty), mask=valid)
        else:  # partial results [B, H, SPLITS, D] and their maxima and denominators [B, H, SPLITS, 2], float32
            row = (b * G * tl.num_programs(1) + heads) * SPLITS + split  # [GP]
            tl.store(PO + row[:, None] * D + d[None, :], acc, mask=valid)
            tl.store(PML + row * 2, m, mask=g < G)
            tl.store(PML + row * 2 + 1, total, mask=g < G)

    @triton.jit
    def _merge_splits(PO, PML, O, stride_ob, stride_oh, H, D: tl.constexpr, SPLITS: tl.constexpr,
                      SP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        i = tl.arange(0, SP)
        d = tl.arange(0, D)
        row = (b * H + h) * SPLITS + i  # [SP]
        used = i < SPLITS
        m = tl.load(PML + row * 2, mask=used, other=float("-inf"))
        total = tl.load(PML + row * 2 + 1, mask=used, other=0.0)
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # no token at all (padding): every weight is 0
        weight = tl.exp(m - top)  # [SP]; empty splits (m = -inf) weigh 0
        acc = tl.load(PO + row[:, None] * D + d[None, :], mask=used[:, None], other=0.0)  # [SP, D]
        denominator = tl.sum(weight * total, 0)
        out = tl.sum(weight[:, None] * acc, 0) / tl.where(denominator > 0, denominator, 1.0)
        tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


@functools.cache
def available(device_type: str) -> bool:
    """Whether the kernel can run on this kind of device: CUDA with Triton, or any device under the interpreter."""
    if triton is None:
        return False
    if device_type == "cuda":
        return True
    from triton import knobs  # the interpreter flag, as Triton read it at import
    return bool(getattr(knobs.runtime, "interpret", False))


def split_size(max_tokens: int) -> int:
    """Tokens per split for sequences of at most `max_tokens`: MIN_SPLIT, doubled until MAX_SPLITS splits cover
    them (a multiple of BLOCK_N)."""
    size = MIN_SPLIT
    while size * MAX_SPLITS < max_tokens:
        size *= 2
    return size


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """q [B, H, D], k and v [B, Hkv, D]; caches [blocks, Hkv, S, D]; tables [B, W] on the device: each row's
    length, then its block table. Writes the new K/V, returns the attention output [B, H, D]."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if D & (D - 1) or min(q.stride(-1), k.stride(-1), v.stride(-1), k_cache.stride(-1)) != 1:
        raise ValueError("the paged decode kernel needs a power-of-two head size and contiguous heads")
    G = H // Hkv
    max_tokens = (tables.shape[1] - 1) * S  # what the widest block table holds
    split = split_size(max_tokens)
    splits = -(-max_tokens // split)
    # The interpreter's bf16 matrix product is wrong (Triton 3.9), so there bf16 operands are multiplied in float32.
    interpreted = q.device.type != "cuda"
    out = torch.empty_like(q)
    partial = torch.empty(B * H * splits * D if splits > 1 else 1, dtype=torch.float32, device=q.device)
    maxima = torch.empty(B * H * splits * 2 if splits > 1 else 1, dtype=torch.float32, device=q.device)
    _write_new_kv[(B, Hkv)](
        k, v, k_cache, v_cache, tables, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0), D=D, S=S)
    _paged_decode[(B, Hkv, splits)](
        q, k_cache, v_cache, tables, out, partial, maxima, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0), out.stride(0), out.stride(1),
        D ** -0.5, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, S=S, BN=BLOCK_N, SPLIT=split, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
        UPCAST=interpreted and q.dtype == torch.bfloat16)
    if splits > 1:
        _merge_splits[(B, H)](partial, maxima, out, out.stride(0), out.stride(1), H, D=D, SPLITS=splits,
                              SP=triton.next_power_of_2(splits))
    return out
