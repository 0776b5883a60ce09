"""A small GGUF reader: the metadata and tensor table, with tensor bytes left memory-mapped on disk.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array; on a file with a
49k-token vocabulary and 49k merges that alone takes ~2.7 s, which the server would pay at every
start. Walking the same header with `struct` takes a small fraction of that. Only little-endian
GGUF v2/v3 files are read, which is what llama.cpp writes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# Metadata value type id -> the little-endian struct format of one value; 8 and 9 are handled apart.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists the fastest-varying dimension first, so reversed
    qtype: GGMLQuantizationType | int  # a bare int when the gguf package does not know the type id
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.qtype.name if isinstance(self.qtype, GGMLQuantizationType) else f"type id {self.qtype}"


class _Cursor:
    """Reads GGUF values one after another from a byte buffer."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: struct.Struct) -> Any:
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def count(self, item_size: int = 1) -> int:
        # A corrupt length must fail here, not allocate or loop billions of times.
        n = self.unpack(_U64)
        if n * item_size > len(self.buf) - self.pos:
            raise ValueError(f"length {n} at byte {self.pos - 8} runs past the end of the file")
        return n

    def string(self) -> str:
        n = self.count()
        s = str(self.buf[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack(_U32)
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type].replace("?", "b1"))
                n = self.count(dtype.itemsize)
                items = np.frombuffer(self.buf, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return items.tolist()
            return [self.value(item_type) for _ in range(self.count(8))]  # strings and arrays: >= 8 bytes each
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.unpack(struct.Struct(_SCALARS[vtype]))


def _parse(buf: memoryview) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.unpack(_U32)
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"GGUF version {version} is not supported, only 2 and 3{hint}")
    n_tensors, n_kv = cur.unpack(_U64), cur.unpack(_U64)

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack(_U32))

    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack(_U32)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += 8 * n_dims
        type_id, rel_offset = cur.unpack(_U32), cur.unpack(_U64)
        entries.append((name, dims, type_id, rel_offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = cur.pos + (-cur.pos % alignment)
    tensors = {}
    for name, dims, type_id, rel_offset in entries:
        try:
            qtype: GGMLQuantizationType | int = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            qtype, block, type_size = type_id, 1, 0  # unknown type: size unknown, rejected by the loader
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        info = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + rel_offset, nbytes)
        if info.offset + nbytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated download?)")
        tensors[name] = info
    return metadata, tensors


class GGUFFile:
    """The parsed header of a GGUF file; tensor bytes are read from a memory map on demand."""

    def __init__(self, path: str | PathLike):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:  # ValueError: numpy cannot map an empty file
            raise ValueError(f"cannot read {self.path} as a GGUF file: {e}") from None
        try:
            self.metadata, self.tensors = _parse(memoryview(self._data))
        except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            raise ValueError(f"{self.path} is not a valid GGUF file: {e}") from None

    def tensor_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """The raw bytes of one tensor, uint8 [*shape[:-1], bytes per row] (what `gguf.quants.dequantize` takes)."""
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        if info.shape[-1] % block:
            raise ValueError(f"tensor {info.name!r}: row length {info.shape[-1]} is not a multiple of "
                             f"the {info.type_name} block size {block}")
        raw = self._data[info.offset:info.offset + info.nbytes].view(np.ndarray)
        return raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)

    def release(self, info: GGUFTensorInfo) -> None:
        """Drop a tensor's pages from this process's map of the file once it is read: they stay in the page cache
        (a later read faults them back), but the process's resident memory no longer grows by the whole file
        while its tensors are read one by one."""
        map_ = getattr(self._data, "_mmap", None)
        if map_ is None or not hasattr(map_, "madvise"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        end = min(info.offset + info.nbytes, len(self._data))
        if end > start:
            map_.madvise(mmap.MADV_DONTNEED, start, end - start)
