"""Weights on huge pages: one 2 MiB-aligned arena, advised to the kernel as MADV_HUGEPAGE, holds every packed buffer.

A decode step on one sequence reads every weight once, streaming from memory; with 4 KiB pages each 2 MiB of
weights costs 512 TLB misses and the hardware prefetchers stop at every page boundary. Read from 2 MiB pages the
same bytes stream faster on this machine (a 1 GiB read: 20–22 GB/s on 4 KiB pages, 29–45 GB/s on 2 MiB ones;
the README has the kernel's figures). Linux only: elsewhere, or where transparent huge pages are off, the arena is
ordinary memory and nothing else changes.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each buffer's start in the arena: a cache line, as torch aligns its own allocations
MADV_HUGEPAGE = 14


def _advise_huge(address: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def huge_page_buffer(nbytes: int) -> tuple[torch.Tensor, bool]:
    """An uninitialised uint8 tensor of `nbytes` starting on a 2 MiB boundary, advised for huge pages before any
    of it is touched, so the pages it faults in are huge ones; and whether the advice was taken."""
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    buffer = raw[start:start + nbytes]
    return buffer, nbytes > 0 and _advise_huge(buffer.data_ptr(), nbytes)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps what was freed, so resident memory would stay at
    its highest point); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def gather_on_huge_pages(modules: Iterable[nn.Module], names: tuple[str, ...], trim_every: int = 64 << 20) -> int:
    """Move the buffers `names` of `modules` into one huge-page arena, keeping which of them share storage (views
    stay views of the same bytes). Returns the arena's size in bytes (0 when there was nothing to move).

    Each storage is let go as soon as it is copied, and the heap trimmed every `trim_every` bytes, so the move
    needs little more memory than the weights themselves (copying all before letting go needed twice that)."""
    by_storage: dict[int, list[tuple[nn.Module, str]]] = {}
    sizes: dict[int, int] = {}
    for module in modules:
        for name in names:
            tensor = getattr(module, name, None)
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                by_storage.setdefault(storage.data_ptr(), []).append((module, name))
                sizes[storage.data_ptr()] = storage.nbytes()
    offsets, total = {}, 0
    for ptr, size in sizes.items():
        offsets[ptr] = total
        total += -(-size // ALIGN) * ALIGN
    if not total:
        return 0
    arena, advised = huge_page_buffer(total)
    moved = 0
    for ptr, holders in by_storage.items():
        storage = getattr(*holders[0]).untyped_storage()
        base = arena[offsets[ptr]:offsets[ptr] + sizes[ptr]]
        base.copy_(torch.tensor([], dtype=torch.uint8).set_(storage))
        for module, name in holders:
            old = getattr(module, name)
            start = base.storage_offset() // old.element_size() + old.storage_offset()
            setattr(module, name, torch.tensor([], dtype=old.dtype).set_(base.untyped_storage(), start, old.size(),
                                                                         old.stride()))
        del storage, old
        moved += sizes[ptr]
        if moved >= trim_every:
            trim_heap()
            moved = 0
    if not advised:
        log.info("weights are not on huge pages (madvise refused; transparent huge pages may be off)")
    return total
