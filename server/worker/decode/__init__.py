"""Decode steps prepared at start-up (the contract is in step.py): compiled by Inductor on CPU (compiled.py),
captured as CUDA graphs on CUDA (graphs.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.llama import Llama
from server.worker.decode.compiled import CompiledDecode
from server.worker.decode.graphs import CapturedDecode
from server.worker.decode.step import DecodeStep

log = logging.getLogger(__name__)


# Dynamo's state is the process's: one step is prepared at a time (a runner's may compile on a thread of its own).
_preparing = threading.Lock()


def prepared_decode_step(model: Llama, cache: KVCache, max_batch: int, max_model_len: int,
                         device: torch.device, beside: bool = False) -> DecodeStep | None:
    """The device's decode step, prepared; None (decode eagerly) where there is none or preparing it failed.
    `beside`: prepared after another step that stays in use (a draft model's, after the target's)."""
    with _preparing:
        if device.type == "cuda":
            step = CapturedDecode(model, cache, max_batch, max_model_len, device)
        elif device.type == "cpu":
            step = CompiledDecode(model, cache, max_batch, device, beside=beside)
        else:
            log.info("no prepared decode step on %s; decoding eagerly", device)
            return None
        return step if step.prepare() else None


def decode_rows(model: Llama, cache: KVCache, step: DecodeStep | None, rows: list[tuple[int, int, tuple[int, ...]]],
                device: torch.device) -> torch.Tensor:
    """Logits [n, vocab] of n decode rows (token, position, blocks) through the prepared step, or eagerly without
    one; rows of one sequence at successive positions included (the attention op writes every row's K/V first).
    Through a step, a view of its buffer: use it before the next run."""
    tokens, positions, tables = (list(column) for column in zip(*rows))
    if step is not None:
        return step.run(tokens, positions, tables)
    chunks = [SequenceChunk(0, p, [t], decode=True, blocks=b) for t, p, b in zip(tokens, positions, tables)]
    return model(ForwardBatch.build(chunks, device, cache.block_size), cache)


TIMING_CONTEXT = 256  # tokens each row attends to when decode steps are timed


def time_decode_rows(run: Callable[[list[tuple[int, int, tuple[int, ...]]]], object], cache: KVCache,
                     max_rows: int, max_len: int, repeats: int = 3) -> list[float]:
    """Seconds a decode step of r rows takes through `run` (rows of (token, position, blocks)), r = 1 .. max_rows:
    the best of `repeats`. Every row sits at position TIMING_CONTEXT - 1 (or the last of `max_len` positions) of
    the cache's first blocks (one sequence's: timed before any request, when nothing else is there), so it attends
    to as many tokens as a serving step's row might."""
    context = min(TIMING_CONTEXT, cache.num_tokens, max_len)
    table = tuple(range(-(-context // cache.block_size)))
    cuda = cache.k.device.type == "cuda"
    seconds = []
    for r in range(1, max_rows + 1):
        rows = [(0, context - 1, table)] * r
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(rows)
            if cuda:
                torch.cuda.synchronize(cache.k.device)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds
