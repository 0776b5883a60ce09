"""Small helpers more than one test folder uses."""

from __future__ import annotations

from model.attention import ATTENTION_IMPLS


def set_attention_impl(model, impl: str) -> None:
    """Every attention layer of `model` through `impl` ("sdpa", "reference" or "triton")."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
    for layer in model.model.layers:
        layer.self_attn.impl = impl
