"""A safetensors copy of a GGUF file's dequantised weights, so that later starts skip dequantising.

One cache file per (GGUF path, dtype), named after both; the GGUF's size and mtime are stored in the
file's metadata and checked on every read, so a changed GGUF overwrites its stale copy instead of
piling up new ones. Any cache file that cannot be read or does not match is treated as missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open

from model.paths import default_cache_dir

log = logging.getLogger(__name__)

# Bump when the conversion changes, so that caches written by older code are not trusted.
CACHE_FORMAT = "llama3-server/gguf-cache/1"
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def cache_file(source: str | PathLike, dtype: torch.dtype, cache_dir: str | PathLike | None = None,
               skip: frozenset[str] = frozenset()) -> Path:
    """One file per source, dtype and set of weights left out (those served packed)."""
    source = Path(source).resolve()
    key = hashlib.sha256((str(source) + "\0" + "\0".join(sorted(skip))).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"{source.stem}-{key}-{_DTYPE_NAMES[dtype]}.safetensors"


def source_stamp(source: str | PathLike, dtype: torch.dtype, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """What a cache file must record to be used for `source` (safetensors metadata is str -> str)."""
    source = Path(source).resolve()
    st = source.stat()
    return {"format": CACHE_FORMAT, "source": str(source), "size": str(st.st_size),
            "mtime_ns": str(st.st_mtime_ns), "dtype": _DTYPE_NAMES[dtype], "skip": ",".join(sorted(skip))}


def read_cache(file: Path, stamp: Mapping[str, str]) -> dict[str, torch.Tensor] | None:
    """The cached state dict, memory-mapped, or None when there is no usable cache file."""
    if not file.is_file():
        return None
    try:
        with safe_open(file, framework="pt") as f:
            if f.metadata() != stamp:
                log.info("weight cache %s is stale; rewriting it", file)
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - whatever is wrong with a cache, reconverting fixes it
        log.warning("ignoring unreadable weight cache %s (%s); rewriting it", file, e)
        return None


def write_cache(file: Path, stamp: Mapping[str, str], layout: Mapping[str, tuple[int, ...]],
                tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write `tensors` (in `layout` order, all of dtype `stamp["dtype"]`) as a safetensors file.

    Streams one tensor at a time (safetensors' own writer first builds the whole file in memory) to a
    temporary file in the same directory, then renames it over `file`, so readers never see half a file."""
    dtype_name = stamp["dtype"]
    itemsize = torch.empty(0, dtype={v: k for k, v in _DTYPE_NAMES.items()}[dtype_name]).element_size()
    header: dict[str, object] = {"__metadata__": dict(stamp)}
    offset = 0
    for name, shape in layout.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec allows space padding; it keeps the tensor data 8-byte aligned

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for (name, tensor), (expected, shape) in zip(tensors, layout.items(), strict=True):
                if name != expected or tuple(tensor.shape) != shape or _DTYPE_NAMES[tensor.dtype] != dtype_name:
                    raise RuntimeError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match "
                                       f"the cache layout ({expected} {shape} {dtype_name})")
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            out.flush()
            os.fsync(out.fileno())  # the rename must not land before the data does
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
