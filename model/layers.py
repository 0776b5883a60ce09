"""The two small layers of a Llama block: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel import Shard, all_reduce


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the gain, the order the reference checkpoints were trained with.
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
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return row_parallel(self.down_proj, F.silu(gate) * up, self.split)


def row_parallel(layer: nn.Module, x: torch.Tensor, split: bool) -> torch.Tensor:
    """`layer(x)`; when the model is split, the sum over the ranks of their partial results, rounded to x's dtype
    once (a packed layer's partials are float32)."""
    if not split:
        return layer(x)
    return all_reduce(layer(x)).to(x.dtype)
