"""Rotary position embeddings with Llama 3 frequency scaling, split-halves rotation.

For bfloat16 activations on the CPU the rotation runs on our C kernel (`llama3::rope`, model/kernels/elementwise.c),
in float32 with one rounding per value, in eager mode and compiled steps alike."""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig, RopeScaling
from model.kernels import cpu as cpu_kernels
from model.layers import on_cpu_kernels


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The `head_dim // 2` rotation frequencies, in float32.

    Llama 3 stretches long wavelengths (beyond `original / low_freq_factor`) by `factor`, keeps short ones
    (below `original / high_freq_factor`) and blends linearly in wavelength-space between the two bands.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [D/2]
    if scaling is None:
        return inv_freq
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_band = wavelen > original / scaling.low_freq_factor    # long wavelengths: fully scaled
    high_band = wavelen < original / scaling.high_freq_factor  # short wavelengths: untouched
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return torch.where(low_band, inv_freq / scaling.factor, torch.where(high_band, inv_freq, blended))


def rope_tables(config: ModelConfig, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_len), each [max_len, head_dim // 2] in float32."""
    inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)  # [L, D/2]
    return angles.cos(), angles.sin()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    N, heads, D = x.shape
    if x.stride(2) != 1 or (x.stride(1) != D and heads > 1):
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = x.new_empty(N, heads, D)
    cpu_kernels.ELEMENTWISE.rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), N, heads, D)
    return out


_library = torch.library.Library("llama3", "FRAGMENT")
_library.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_library.impl("rope", _rope, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::rope")
def _(x, cos, sin):
    return x.new_empty(x.shape)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [N, heads, D] by per-token tables `cos`, `sin` [N, D/2] (split-halves pairing, as in HF)."""
    if on_cpu_kernels(x) and cos.dtype == torch.float32:
        return torch.ops.llama3.rope.default(x, cos, sin) if torch.compiler.is_compiling() else _rope(x, cos, sin)
    half = x.shape[-1] // 2
    cos = cos.unsqueeze(1).to(x.dtype)  # [N, 1, D/2]
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
