"""Decode steps prepared at start-up (the contract is in step.py): compiled by Inductor on CPU (compiled.py),
captured as CUDA graphs on CUDA (graphs.py)."""

from __future__ import annotations

import logging

import torch

from model.kv_cache import KVCache
from model.llama import Llama
from server.worker.decode.compiled import CompiledDecode
from server.worker.decode.graphs import CapturedDecode
from server.worker.decode.step import DecodeStep

log = logging.getLogger(__name__)


def prepared_decode_step(model: Llama, cache: KVCache, max_batch: int, max_model_len: int,
                         device: torch.device, beside: bool = False) -> DecodeStep | None:
    """The device's decode step, prepared; None (decode eagerly) where there is none or preparing it failed.
    `beside`: prepared after another step that stays in use (a draft model's, after the target's)."""
    if device.type == "cuda":
        step = CapturedDecode(model, cache, max_batch, max_model_len, device)
    elif device.type == "cpu":
        step = CompiledDecode(model, cache, max_batch, device, beside=beside)
    else:
        log.info("no prepared decode step on %s; decoding eagerly", device)
        return None
    return step if step.prepare() else None
