"""The decode step on CUDA: one CUDA graph per batch size of a ladder, captured at start-up over static buffers.

A step's kernels launch as one graph replay instead of hundreds of launches from Python. The graphs read token
ids, positions and the decode table (each row's length, then its block table) from buffers allocated once for
the largest batch and the longest sequence, and write logits into one buffer of that size. A batch runs at the
smallest size of the ladder that holds it; the rows it does not fill have length 0, for which the attention
kernel (model/kernels/triton_decode.py) writes and reads nothing. Before capture the step is compiled by Inductor (the
batch dimension symbolic, so one compilation serves every size), which fuses the small element-wise kernels;
where compilation fails the eager step is captured, and where capture fails the runner decodes eagerly, each
with one log line.
"""

from __future__ import annotations

import logging
import time

import torch

from model.batch import upload
from model.kernels.triton_decode import available as triton_available
from model.kv_cache import KVCache
from model.llama import Llama
from server.worker.decode.step import DecodeStep

log = logging.getLogger(__name__)


def graph_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, and max_batch itself: padding never adds more than 7 rows past 8."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class CapturedDecode(DecodeStep):
    def __init__(self, model: Llama, cache: KVCache, max_batch: int, max_model_len: int, device: torch.device,
                 compile: bool = True):
        super().__init__(model, cache, max_batch, device, sizes=graph_sizes(max_batch))
        width = 1 + -(-max_model_len // cache.block_size)  # length, then the most blocks a sequence holds
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_batch, width, dtype=torch.long, device=device)
        self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.compile = compile
        self.mode = "eager"  # what was captured: "compiled", "eager"; stays "eager" (no graphs) when capture fails

    def _step(self, step, size: int) -> None:
        """One decode step of `size` rows over the static buffers, logits into self.logits[:size]."""
        inputs = (self.input_ids[:size], self.positions[:size], self.tables[:size])
        if step is not self._forward:
            for t in inputs:  # one compilation for every size (an unbacked size is never specialised)
                torch._dynamo.decorators.mark_unbacked(t, 0)
        self.logits[:size].copy_(step(*inputs, None))  # the Triton kernel reads no host table

    def _capture(self, step) -> None:
        self.graphs.clear()
        self.tables.zero_()  # every row padding while capturing: nothing is written to the cache
        warmup = torch.cuda.Stream(self.device)
        warmup.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warmup):  # first runs compile, autotune and create library handles, off the graphs
            for size in self.sizes:
                self._step(step, size)
        torch.cuda.current_stream(self.device).wait_stream(warmup)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()  # the graphs run one at a time, so they share their scratch memory
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(step, size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def prepare(self) -> bool:
        """Capture the ladder, compiled if possible; False, with one log line, when no graph could be captured."""
        if not triton_available(self.device.type):
            log.warning("no Triton: CUDA graphs need its paged attention kernel; decoding eagerly")
            return False
        start = time.perf_counter()
        attempts = [("compiled", lambda: torch.compile(self._forward, fullgraph=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}))] if self.compile else []
        attempts.append(("eager", lambda: self._forward))
        for mode, make in attempts:
            try:
                with torch.no_grad():
                    self._capture(make())
            except Exception as e:  # noqa: BLE001 - the next attempt, or eager decoding, still works
                log.debug("capture failed", exc_info=True)
                log.warning("decode step not captured %s (%s: %s)", mode, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                self.graphs.clear()
                continue
            self.mode = mode
            log.info("decode step captured (%s) as %d CUDA graphs for batches of 1 to %d in %.1f s", mode,
                     len(self.graphs), self.max_batch, time.perf_counter() - start)
            return True
        log.warning("decoding eagerly, without CUDA graphs")
        return False

    def _launch(self, size: int, rows: torch.Tensor) -> torch.Tensor:
        # Asynchronous copies: the replay is queued behind them, and the host does not wait for the device.
        upload(rows[:, 0], self.device, self.input_ids[:size])
        upload(rows[:, 1], self.device, self.positions[:size])
        upload(rows[:, 2:], self.device, self.tables[:size, :rows.shape[1] - 2])  # columns past these: unread
        graph = self.graphs.get(size)
        if graph is None:  # not captured (the tests, on CPU): the same step, run eagerly
            with torch.no_grad():
                self._step(self._forward, size)
        else:
            graph.replay()
        return self.logits[:size]
