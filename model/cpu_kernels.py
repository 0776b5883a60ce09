"""C kernels for the CPU, built on first use with the system's C compiler and loaded with ctypes.

Only what torch has no fast kernel for: decode attention (`kernels/decode_attention.c`). The shared library is
cached under the weight cache directory, keyed by the source and the compiler flags, so it is built once per
machine. Without a compiler, `decode_attention_kernel()` returns None and callers use SDPA instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from model.gguf_cache import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "decode_attention.c"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_FUNCTIONS = {torch.bfloat16: "decode_attention_bf16", torch.float32: "decode_attention_f32"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: decode attention runs on SDPA")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, platform.node()]).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"decode_attention-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", b"") or b""
            log.warning("cannot build the decode attention kernel (%s %s): decode attention runs on SDPA",
                        e, detail.decode(errors="replace")[:200])
            return None
    library = ctypes.CDLL(str(target))
    for name in _FUNCTIONS.values():
        fn = getattr(library, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6 + [ctypes.c_float]
    return library


@functools.cache
def decode_attention_kernel(dtype: torch.dtype):
    """`fn(q, k, v, k_cache, v_cache, host) -> out` for CPU tensors of `dtype`, or None when unavailable."""
    if dtype not in _FUNCTIONS:
        return None
    library = _library()
    if library is None:
        return None
    fn = getattr(library, _FUNCTIONS[dtype])

    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """q [B, Hkv, G, D]; k, v [B, Hkv, D], written at position lens - 1 of their slot first; k_cache, v_cache
        [slots, Hkv, L, D] with contiguous rows; host [2, B] int64 on the CPU: slots, lens (0: a padding row).
        Returns [B, Hkv, G, D]."""
        B, Hkv, G, D = q.shape
        if k_cache.stride() != v_cache.stride() or k_cache.stride()[2:] != (D, 1):
            raise ValueError("decode attention needs K and V caches with the same strides and contiguous rows")
        q, k, v, host = q.contiguous(), k.contiguous(), v.contiguous(), host.contiguous()
        out = torch.empty_like(q)
        fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
           host.data_ptr(), host.data_ptr() + 8 * B, B, Hkv, G, D, k_cache.stride(0), k_cache.stride(1), D ** -0.5)
        return out

    return decode_attention
