"""GGUF quantised blocks decoded, exactly, into the codes and scales of packed layers (`model.quant.PackedWeight`).

Every type below is a code times a scale plus an offset, per group of 32 weights (16 for Q6_K):
  Q4_0  (q - 8) d            q in [0, 16)    Q4_1  q d + m
  Q5_0  (q - 16) d           q in [0, 32)    Q5_1  q d + m
  Q8_0  q d                  q in [-127, 127]
  Q4_K  q d sc - dmin mn     q in [0, 16), d and dmin per 256 weights, sc and mn 6-bit per group of 32
  Q5_K  the same with q in [0, 32)
  Q6_K  (q - 32) d sc        q in [0, 64), d per 256, sc an 8-bit signed number per 16
A row of N weights is a row of blocks; `raw` is the tensor's bytes as uint8 [rows, bytes per row].
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from model.quant import K16, K32, LEGACY, PackedWeight

# The types served packed, exactly as stored.
PACKED_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})


def _blocks(raw: np.ndarray, size: int) -> np.ndarray:
    """[rows, blocks, block bytes]"""
    return np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block → 32 codes: byte j holds code j in its low nibble and code j + 16 in its high one."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(words: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bits of uint32 words: [..., count]."""
    return (words[..., None] >> np.arange(count, dtype=np.uint32)) & 1


def _legacy(rows: int, codes: np.ndarray, d: np.ndarray, m: np.ndarray, bits: int) -> PackedWeight:
    return PackedWeight(bits, LEGACY, torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1))),
                        torch.from_numpy(np.ascontiguousarray(d)), torch.from_numpy(np.ascontiguousarray(m)))


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 sub-blocks' 6-bit scales and mins of a Q4_K/Q5_K block's 12 bytes: [..., 8] each."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def decode(raw: np.ndarray, qtype: Q, chunk: int = 4096) -> PackedWeight:
    """The packed form of a tensor of one of PACKED_TYPES, decoded `chunk` rows at a time into the result: decoding
    takes temporaries several times the codes (1.4 GB for a 1B model's 128k-row embedding at once)."""
    if raw.shape[0] <= chunk:
        return _decode(raw, qtype)
    first = _decode(raw[:chunk], qtype)
    names = [n for n in ("codes", "d", "m", "sub") if getattr(first, n) is not None]
    out = {n: getattr(first, n).new_empty((raw.shape[0], *getattr(first, n).shape[1:])) for n in names}
    for start in range(0, raw.shape[0], chunk):
        part = first if start == 0 else _decode(raw[start:start + chunk], qtype)
        for n in names:
            out[n][start:start + chunk] = getattr(part, n)
    return PackedWeight(first.bits, first.kind, out["codes"], out["d"], out["m"], out.get("sub"))


def _decode(raw: np.ndarray, qtype: Q) -> PackedWeight:
    rows = raw.shape[0]
    if qtype in (Q.Q4_0, Q.Q4_1):
        header = 2 if qtype == Q.Q4_0 else 4
        b = _blocks(raw, header + 16)
        d = _f16(b, 0)
        m = _f16(b, 2) if qtype == Q.Q4_1 else (-8 * d.astype(np.float32)).astype(np.float16)
        return _legacy(rows, _nibbles(b[..., header:]), d, m, 4)
    if qtype in (Q.Q5_0, Q.Q5_1):
        header = 2 if qtype == Q.Q5_0 else 4
        b = _blocks(raw, header + 4 + 16)
        d = _f16(b, 0)
        m = _f16(b, 2) if qtype == Q.Q5_1 else (-16 * d.astype(np.float32)).astype(np.float16)
        qh = b[..., header:header + 4].copy().view(np.uint32)[..., 0]
        codes = _nibbles(b[..., header + 4:]) | (_bits(qh, 32).astype(np.uint8) << 4)
        return _legacy(rows, codes, d, m, 5)
    if qtype == Q.Q8_0:
        b = _blocks(raw, 34)
        codes = b[..., 2:].copy().view(np.int8)
        return _legacy(rows, codes, _f16(b, 0), np.zeros(b.shape[:2], np.float16), 8)
    if qtype in (Q.Q4_K, Q.Q5_K):
        five = qtype == Q.Q5_K
        b = _blocks(raw, 176 if five else 144)
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scales(b[..., 4:16])                                        # [rows, blocks, 8]
        qs = b[..., 48:] if five else b[..., 16:]                               # [rows, blocks, 128]
        chunks = qs.reshape(*qs.shape[:2], 4, 32)                               # 4 chunks of 64 codes
        codes = np.stack([chunks & 0x0F, chunks >> 4], axis=3).reshape(*qs.shape[:2], 256)  # sub-block 2i, 2i + 1
        if five:
            qh = b[..., 16:48]                                                  # [rows, blocks, 32]: bit s of byte l
            high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1   # [rows, blocks, 8, 32]
            codes = codes | (high.reshape(*qs.shape[:2], 256) << 4)
        sub = np.stack([sc, mn], axis=-1).reshape(rows, -1, 2)                  # [rows, groups, (a, b)]
        return PackedWeight(5 if five else 4, K32, torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1))),
                            torch.from_numpy(d.copy()), torch.from_numpy((-dmin.astype(np.float32)).astype(np.float16)),
                            torch.from_numpy(sub.astype(np.uint8)))
    if qtype == Q.Q6_K:
        b = _blocks(raw, 210)
        ql, qh = b[..., :128].reshape(*b.shape[:2], 2, 64), b[..., 128:192].reshape(*b.shape[:2], 2, 32)
        sc = b[..., 192:208].copy().view(np.int8)                               # [rows, blocks, 16]
        d = _f16(b, 208)
        low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)
        high = np.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-2)  # [rows, blocks, 2, 4, 32]
        codes = (low | (high << 4)).reshape(rows, -1)                           # half, quarter, position: in order
        sub = sc.reshape(rows, -1, 2).view(np.uint8)                            # [rows, groups, (a_lo, a_hi)]
        return PackedWeight(6, K16, torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(d.copy()),
                            torch.from_numpy((-32 * d.astype(np.float32)).astype(np.float16)),
                            torch.from_numpy(np.ascontiguousarray(sub)))
    raise ValueError(f"no packed form of {qtype.name}")
