"""The prepared decode step: a decode-only forward pass without per-operator Python dispatch.

Inputs are copied into static buffers sized for the largest batch; a batch runs at the smallest size of the
ladder that holds it, padded with rows of length 0 (the attention op writes and reads nothing for them). The
step is prepared once at start-up. On CPU it is compiled by Inductor's C++ backend with the batch dimension left
symbolic, so one graph (the same generated code) serves every size, and the ladder on CPU is every size:
padding would only add rows to multiply. Compiled code is cached on disk, so a restart skips the compiler.
Anything that stops compilation (no C++ compiler, an unsupported op) leaves the runner on eager mode with one
log line.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from model.batch import ForwardBatch
from model.gguf_cache import default_cache_dir
from model.kv_cache import KVCache
from model.llama import Llama

log = logging.getLogger(__name__)


def use_persistent_compile_cache() -> None:
    """Keep Inductor's cache beside the weight cache rather than in /tmp, so that a restart skips the compiler.
    Call before anything compiles; a TORCHINDUCTOR_CACHE_DIR the user set wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))


class PreparedDecode:
    def __init__(self, model: Llama, cache: KVCache, max_batch: int, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.max_batch = max_batch
        self.sizes = list(range(1, max_batch + 1))
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        # The weights never change after loading, so guards on the modules would only cost time every step; a C++
        # wrapper calls the generated kernels without the Python interpreter (1.5 ms a step at batch 1).
        self._compiled = torch.compile(self._forward, fullgraph=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})

    def _forward(self, input_ids, positions, tables, host) -> torch.Tensor:
        batch = ForwardBatch(input_ids=input_ids, positions=positions, write_blocks=positions, write_rows=positions,
                             logits_indices=positions, num_decode=input_ids.shape[0], decode_tables=tables,
                             decode_host=host, max_position=0, prefills=())
        return self.model.run(batch, self.cache)

    def size_for(self, n: int) -> int | None:
        return next((size for size in self.sizes if size >= n), None)

    def prepare(self) -> bool:
        """Compile (or load from the disk cache) the step, running the smallest and largest sizes on padding rows
        alone; False, with one log line, when that fails."""
        start = time.perf_counter()
        try:
            for size in sorted({1, self.max_batch}):
                self._run_padded(size, [])
        except Exception as e:  # noqa: BLE001 - whatever the compiler cannot do, eager mode can
            log.debug("compilation failed", exc_info=True)
            log.warning("decode step not compiled (%s: %s); running eagerly", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return False
        log.info("decode step compiled for batches of 1 to %d in %.1f s (Inductor cache: %s)", self.max_batch,
                 time.perf_counter() - start, os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))
        return True

    def run(self, token_ids: list[int], positions: list[int], tables: list[tuple[int, ...]]) -> torch.Tensor:
        """Logits [n, vocab] (float32) of n decode rows: token i at positions[i] of the sequence whose blocks are
        tables[i]."""
        n = len(token_ids)
        size = self.size_for(n)
        if size is None:
            raise ValueError(f"a prepared decode step holds at most {self.max_batch} rows, got {n}")
        return self._run_padded(size, list(zip(token_ids, positions, tables)))[:n]

    def _run_padded(self, size: int, rows: list[tuple[int, int, tuple[int, ...]]]) -> torch.Tensor:
        S = self.cache.block_size
        pad = [(0, 0, ())] * (size - len(rows))
        tokens, positions, tables = (list(column) for column in zip(*(rows + pad)))
        counts = [p // S + 1 for p in positions[:len(rows)]]  # blocks each row's tokens cover
        width = 1 + max(counts, default=1)
        # [size, width], read by the attention op on the host: length, then the blocks it covers (padding: 0s)
        host = torch.tensor([[p + 1, *t[:nb]] + [0] * (width - 1 - nb) for p, t, nb in zip(positions, tables, counts)]
                            + [[0] * width] * len(pad), dtype=torch.long)
        inputs = []
        for buffer, values in ((self.input_ids, tokens), (self.positions, positions)):
            view = buffer[:size]
            view.copy_(torch.as_tensor(values), non_blocking=True)
            inputs.append(view)
        tables_on_device = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        # The batch dimension stays symbolic, 1 included (an unbacked size is never specialised), so one graph,
        # the same generated code, serves every batch size; so does the tables' width.
        for t in inputs:
            torch._dynamo.decorators.mark_unbacked(t, 0)
        for t in {id(host): host, id(tables_on_device): tables_on_device}.values():
            torch._dynamo.decorators.mark_unbacked(t, 0)
            torch._dynamo.decorators.mark_unbacked(t, 1)
        with torch.no_grad():
            return self._compiled(*inputs, tables_on_device, host)
