"""Weight-only 4-bit linear layers on torch's packed int4 CPU kernel, and the ways to fill them.

A weight is stored as 4-bit codes `q` in [0, 16) with one (scale, zero) pair per group of 32 input features,
and stands for `(q - 8) * scale + zero`. llama.cpp's Q4_0 (`(q - 8) * d`) and Q4_1 (`q * d + m`) blocks are
exactly this with scale `d` and zero `0` or `m + 8d`, so a GGUF's 4-bit tensors are served as they are;
any other float weight can be quantised to it (asymmetric min/max per group).

The kernel (`_weight_int4pack_mm_for_cpu`) computes each row of the output on its own, so a row's result
does not depend on how many rows are multiplied with it; its AVX-512 path needs bfloat16 activations. It
is fast for a few rows and slower than a dense bfloat16 matrix for hundreds, so a layer may also keep a
dense copy for prompt tokens (see `Int4Linear.forward`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

GROUP_SIZE = 32          # llama.cpp's Q4_0/Q4_1 block, and the kernel's finest group
INNER_K_TILES = 2        # the CPU packing's tile parameter; it does not change the results


class Int4Linear(nn.Module):
    """y = x W^T with W in packed int4; `dense_weight`, when kept, serves the rows the caller marks as prompt."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                 dense_weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)                      # uint8 [N, K / 2], the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [K / 32, N, 2]
        self.dense_weight = None if dense_weight is None else nn.Parameter(dense_weight, requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   dense_weight: torch.Tensor | None = None) -> Int4Linear:
        """codes int [N, K] in [0, 16); scales, zeros [N, K / 32] for `(q - 8) * scale + zero`."""
        N, K = codes.shape
        if K % GROUP_SIZE or scales.shape != (N, K // GROUP_SIZE) or zeros.shape != scales.shape:
            raise ValueError(f"int4 weight {tuple(codes.shape)} needs [N, K / {GROUP_SIZE}] scales and zeros, "
                             f"got {tuple(scales.shape)} and {tuple(zeros.shape)}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), INNER_K_TILES)
        scales, zeros = bfloat16_scales(codes, scales, zeros)
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # [K / 32, N, 2]
        return cls(packed, sz, K, dense_weight)

    @classmethod
    def quantize(cls, weight: torch.Tensor, keep_dense: bool = False) -> Int4Linear:
        """Asymmetric min/max quantisation of a float weight [N, K], 32 input features per group."""
        codes, scales, zeros = quantize_int4(weight)
        return cls.from_codes(codes, scales, zeros, weight.to(torch.bfloat16) if keep_dense else None)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K] in float32 (for tests and accuracy checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self._packed_mm(eye).float().t().contiguous()

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)

    def forward(self, x: torch.Tensor, num_packed_rows: int | None = None) -> torch.Tensor:
        """x [M, K]. Rows from `num_packed_rows` on use the dense copy (when one is kept); None: all packed."""
        dtype = x.dtype
        x = x.to(torch.bfloat16)
        if self.dense_weight is None or num_packed_rows is None or num_packed_rows >= x.shape[0]:
            return self._packed_mm(x).to(dtype)
        dense = x[num_packed_rows:] @ self.dense_weight.t()
        if num_packed_rows == 0:
            return dense.to(dtype)
        return torch.cat([self._packed_mm(x[:num_packed_rows]), dense]).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP_SIZE}"
                f"{', dense copy for prompts' if self.dense_weight is not None else ''}")


def bfloat16_scales(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel takes scales and zeros in bfloat16 (8 significant bits). Rounding each to nearest leaves an
    error shared by the whole group, so of the two neighbours of each, take the pair that reproduces the
    group's 32 weights best (least squares over its actual codes)."""
    N, K = codes.shape
    q = codes.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE) - 8                  # [N, G, 32]
    target = q * scales[..., None] + zeros[..., None]

    def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nearest = x.to(torch.bfloat16)
        inner = torch.where(x.abs() < nearest.float().abs(), x, nearest.float())  # the binade the gap lies in
        spacing = torch.ldexp(torch.ones_like(x), torch.frexp(inner).exponent - 8)  # bf16's step there
        other = (nearest.float() + torch.sign(x - nearest.float()) * spacing).to(torch.bfloat16)
        return nearest, other

    best, best_err = None, None
    for s in neighbours(scales):
        for z in neighbours(zeros):
            err = ((q * s.float()[..., None] + z.float()[..., None] - target) ** 2).sum(-1)  # [N, G]
            if best is None:
                best, best_err = (s, z), err
            else:
                better = err < best_err
                best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
                best_err = torch.minimum(err, best_err)
    return best


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K], scales and zeros [N, K / 32] such that (codes - 8) * scale + zero ≈ weight."""
    N, K = weight.shape
    if K % GROUP_SIZE:
        raise ValueError(f"int4 quantisation needs in_features divisible by {GROUP_SIZE}, got {K}")
    w = weight.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE)
    lo, hi = w.amin(-1), w.amax(-1)                                       # [N, K / 32]
    scales = ((hi - lo) / 15).clamp_min(1e-10)
    codes = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scales, lo + 8 * scales


def gguf_q4_codes(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zeros of a Q4_0 or Q4_1 tensor, from its raw bytes uint8 [N, bytes per row].

    A block of 32 weights is f16 d (and for Q4_1 f16 m) then 16 bytes: byte j holds weight j in its low
    nibble and weight j + 16 in its high one. Q4_0 means (q - 8) d; Q4_1 means q d + m = (q - 8) d + (m + 8d).
    """
    header = {"Q4_0": 2, "Q4_1": 4}[kind]
    N = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(N, -1, header + 16)                # [N, K / 32, block bytes]
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # [N, K / 32]
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zeros = m + 8 * d
    else:
        zeros = torch.zeros_like(d)
    qs = torch.from_numpy(blocks[..., header:].copy())                            # [N, K / 32, 16]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, -1).to(torch.int32)  # [N, K]
    return codes, d, zeros


QUANTIZATIONS = ("auto", "none", "int4")  # auto: int4 for a GGUF with 4-bit tensors on CPU, else none


def quantize_model(model: nn.Module, codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
                   quantize_others: bool, only: set[str] | None = None, keep_dense: bool = True) -> dict[str, str]:
    """Replace the model's linear layers with `Int4Linear`s, in place; returns {layer name: how}.

    A layer whose checkpoint weight is 4-bit (`codes`, keyed by weight name) is served exactly as stored.
    Others are quantised from their float weight when `quantize_others` (a float checkpoint that opted in),
    else left dense. The output head is a linear like the others, also when it shares the embedding's
    weight (the embedding stays dense for its lookups). `only` limits the change to the layers it names.
    `keep_dense` keeps each layer's float weight too, in bfloat16, for prompt tokens."""
    codes = codes or {}
    done = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (only is not None and name not in only):
            continue
        weight = module.weight.detach()
        if f"{name}.weight" in codes:
            dense = weight.to(torch.bfloat16) if keep_dense else None
            layer, how = Int4Linear.from_codes(*codes[f"{name}.weight"], dense_weight=dense), "int4 as stored"
        elif quantize_others:
            layer, how = Int4Linear.quantize(weight, keep_dense=keep_dense), "int4 quantised at load"
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        done[name] = how
    return done
