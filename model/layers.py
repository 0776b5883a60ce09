"""The two small layers of a Llama block: RMSNorm and the SwiGLU feed-forward.

For bfloat16 activations on the CPU, the norm and SiLU times up run on our C kernels (model/kernels/elementwise.c)
as ops, `llama3::rms_norm` and `llama3::silu_mul`, in eager mode and inside a compiled step alike, so the two give
the same bits; elsewhere (float32, CUDA, no kernels) on torch's operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import cpu as cpu_kernels
from model.parallel import Shard, all_reduce


cpu_kernels.elementwise_kernels()  # built once per machine (cached), loaded here: None where they cannot run


def on_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether x's elementwise work runs on the C kernels: bfloat16 on the CPU, where they could be built."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and cpu_kernels.ELEMENTWISE is not None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    cpu_kernels.ELEMENTWISE.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    N, H = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(N, H)
    cpu_kernels.ELEMENTWISE.silu_mul(gate_up.data_ptr(), out.data_ptr(), N, H)
    return out


# Schema-defined ops (see model/attention.py), opaque to a compiled step, which calls their C entry points.
_library = torch.library.Library("llama3", "FRAGMENT")
_library.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_library.define("silu_mul(Tensor gate_up) -> Tensor")
_library.impl("rms_norm", _rms_norm, "CompositeExplicitAutograd")
_library.impl("silu_mul", _silu_mul, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("llama3::silu_mul")
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the gain, the order the reference checkpoints were trained with.
        if on_cpu_kernels(x) and x.dim() == 2 and self.weight.dtype == torch.bfloat16:
            if torch.compiler.is_compiling():
                return torch.ops.llama3.rms_norm.default(x, self.weight, self.eps)
            return _rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); names match the Hugging Face checkpoint. With `shard.split`, `hidden`
    is this rank's slice and the output its partial sum, added over the ranks here."""

    def __init__(self, dim: int, hidden: int, shard: Shard = Shard()):
        super().__init__()
        self.split = shard.split
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_proj = None  # gate and up fused into one packed layer, when they are packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = on_cpu_kernels(x) and x.dim() == 2  # gate and up come out in x's dtype
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
        elif kernel:  # the kernel takes gate and up side by side: a copy where they are not fused
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        else:
            return row_parallel(self.down_proj, F.silu(self.gate_proj(x)) * self.up_proj(x), self.split)
        if kernel:
            act = torch.ops.llama3.silu_mul.default(gate_up) if torch.compiler.is_compiling() else _silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return row_parallel(self.down_proj, act, self.split)


def row_parallel(layer: nn.Module, x: torch.Tensor, split: bool) -> torch.Tensor:
    """`layer(x)`; when the model is split, the sum over the ranks of their partial results, rounded to x's dtype
    once (a packed layer's partials are float32)."""
    if not split:
        return layer(x)
    return all_reduce(layer(x)).to(x.dtype)
