"""The two small layers of a Llama block: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """SwiGLU: down(silu(gate(x)) * up(x)); names match the Hugging Face checkpoint."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()

    def fuse(self) -> None:
        """One [2 * hidden, dim] matrix for gate and up: one matmul instead of two. The checkpoint-named
        parameters become views of it, so state_dict() and loading are unchanged."""
        fused = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach()
        hidden = self.gate_proj.weight.shape[0]
        self.gate_proj.weight = nn.Parameter(fused[:hidden], requires_grad=False)
        self.up_proj.weight = nn.Parameter(fused[hidden:], requires_grad=False)
        self.gate_up_weight = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)  # [N, hidden] each
        return self.down_proj(F.silu(gate) * up)
