"""GGUF quantised blocks decoded into the codes, scales and offsets of packed layers (see `model.quant`), exactly.

A 4-bit weight is `q * scale + offset` and an 8-bit one `q * scale`, with one scale (and offset) per group of 32
input features: llama.cpp's Q4_0 is `(q - 8) d` (scale d, offset -8d), Q4_1 is `q d + m`, Q8_0 is `q d`.
"""

from __future__ import annotations

import numpy as np
import torch


def _f16_field(blocks: np.ndarray, at: int) -> torch.Tensor:
    return torch.from_numpy(blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32))


def gguf_q4_codes(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and offsets of a Q4_0 or Q4_1 tensor, from its raw bytes uint8 [N, bytes per row].

    A block of 32 weights is f16 d (and for Q4_1 f16 m) then 16 bytes: byte j holds weight j in its low
    nibble and weight j + 16 in its high one. Q4_0 means (q - 8) d = q d - 8d; Q4_1 means q d + m.
    """
    header = {"Q4_0": 2, "Q4_1": 4}[kind]
    N = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(N, -1, header + 16)                # [N, K / 32, block bytes]
    d = _f16_field(blocks, 0)                                                     # [N, K / 32]
    offsets = _f16_field(blocks, 2) if kind == "Q4_1" else -8 * d
    qs = torch.from_numpy(blocks[..., header:].copy())                            # [N, K / 32, 16]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, -1).to(torch.int32)  # [N, K]
    return codes, d, offsets


def gguf_q8_codes(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of a Q8_0 tensor: blocks of f16 d then 32 int8 codes, meaning q d."""
    N = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(N, -1, 34)
    codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(N, -1).to(torch.int32)
    return codes, _f16_field(blocks, 0)
