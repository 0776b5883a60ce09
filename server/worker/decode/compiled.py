"""The decode step on CPU: a decode-only forward pass compiled by Inductor's C++ backend, so that no Python runs
between its kernels.

The batch dimension is left symbolic, so one graph (the same generated code) serves every batch size: the ladder
on CPU is every size, and nothing is padded. Compiled code is cached on disk, so a restart skips the compiler.
Anything that stops compilation (no C++ compiler, an unsupported op) leaves the runner on eager mode with one
log line.
"""

from __future__ import annotations

import logging
import os
import time
import types
import weakref
from collections.abc import Callable

import torch

from model.kernels.cpu import compiled_op_entry_points
from model.kv_cache import KVCache
from model.llama import Llama
from server.worker.decode.step import DecodeStep, decode_table

log = logging.getLogger(__name__)


# The entry points' table holds op handles, which the compile cache's key cannot pickle; the generated code is
# the same either way but for calling them (a graph cached with them loads only where compiled_ops.c built).
if "aot_inductor.custom_ops_to_c_shims" not in torch._inductor.config._cache_config_ignore_prefix:
    torch._inductor.config._cache_config_ignore_prefix.append("aot_inductor.custom_ops_to_c_shims")


_compiled_for: Callable[[], Llama | None] = lambda: None  # the model Dynamo's state was last built for


class CompiledDecode(DecodeStep):
    def __init__(self, model: Llama, cache: KVCache, max_batch: int, device: torch.device, beside: bool = False):
        """`beside`: compiled after another step that stays in use (a draft model's, after the target's)."""
        super().__init__(model, cache, max_batch, device, sizes=list(range(1, max_batch + 1)))
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        # The weights never change after loading, so guards on the modules would only cost time every step; a C++
        # wrapper calls the generated kernels without the Python interpreter (1.5 ms a step at batch 1). The wrapper
        # is built apart from the kernels, at -O1: one -O3 file of both took 126 of a cold start's 190 s on the
        # default model (81 s in all, same step times).
        # With the module guards skipped, nothing in a graph's guards tells one model from another of the same
        # shapes. Dynamo keeps graphs per code object, so each step compiles its own copy of the forward function's
        # code: a draft model's step beside the target's runs its own graph. Dynamo also keeps state per process
        # that let a step for another model (the next test's, same shapes, another weight format) run a graph traced
        # for an earlier one: a step for another model than the last starts from a clean Dynamo, unless it is
        # compiled beside one in use.
        global _compiled_for
        if not beside and _compiled_for() is not model:
            torch._dynamo.reset()
            _compiled_for = weakref.ref(model)
        # Inductor would otherwise build and load a probe library for each vector ISA /proc/cpuinfo lists before
        # its first compile (6 of a cold start's 23 s on a 1B model); the flags are trusted instead, and a build
        # they break fails like any other: the step then runs eagerly, with the same results.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True,
                   "cpp_wrapper_build_separate": True, "cpp.vec_isa_ok": True}
        # The wrapper calls the packed-linear and attention kernels as C functions (compiled_ops.c) rather than
        # through the dispatcher and Python: about 150 calls a step on the default model.
        entry_points = compiled_op_entry_points()
        if entry_points is not None and all(layer.self_attn.impl == "sdpa" for layer in model.model.layers):
            options["aot_inductor.custom_ops_to_c_shims"] = entry_points
        forward = DecodeStep._forward
        own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__)
        self._compiled = torch.compile(types.MethodType(own, self), fullgraph=True, options=options)

    def prepare(self) -> bool:
        """Compile (or load from the disk cache) the step, running the smallest and largest sizes on padding rows
        alone; False, with one log line, when that fails."""
        start = time.perf_counter()
        try:
            for size in sorted({1, self.max_batch}):
                self._launch(size, decode_table([], [], [], size, self.cache.block_size))
        except Exception as e:  # noqa: BLE001 - whatever the compiler cannot do, eager mode can
            log.debug("compilation failed", exc_info=True)
            log.warning("decode step not compiled (%s: %s); running eagerly", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return False
        log.info("decode step compiled for batches of 1 to %d in %.1f s (Inductor cache: %s)", self.max_batch,
                 time.perf_counter() - start, os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))
        return True

    def _launch(self, size: int, rows: torch.Tensor) -> torch.Tensor:
        tokens, positions = self.input_ids[:size], self.positions[:size]
        tokens.copy_(rows[:, 0])
        positions.copy_(rows[:, 1])
        # [size, 1 + W], read by the attention op on the host; a copy at offset 0 whatever the size (a one-row slice
        # is already contiguous, and its offset would be guarded on: a second compilation)
        host = rows[:, 2:].clone(memory_format=torch.contiguous_format)
        # The batch dimension stays symbolic, 1 included (an unbacked size is never specialised), so one graph,
        # the same generated code, serves every batch size; so does the table's width.
        for t in (tokens, positions, host):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        torch._dynamo.decorators.mark_unbacked(host, 1)
        with torch.no_grad():
            return self._compiled(tokens, positions, host, host)
