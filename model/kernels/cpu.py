"""C kernels for the CPU, built on first use with the system's C compiler and loaded with ctypes.

Only what torch has no fast kernel for: decode attention (`decode_attention.c`) and linear layers with
4- and 8-bit weights (`packed_linear.c`); and the decode step's elementwise work in bfloat16 (`elementwise.c`:
RMSNorm, rotary embeddings, SiLU times up), so that eager and compiled steps run the same code. Each shared
library is cached under the weight cache directory, keyed by its source and the compiler flags, so it is built
once per machine. Without a compiler (or without the AVX-512 instructions a kernel needs) the functions below
return None and callers use torch's own operators.
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
import types
from pathlib import Path

import torch

from model.paths import default_cache_dir

log = logging.getLogger(__name__)

KERNELS = Path(__file__).resolve().parent  # the C sources sit beside this module
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_FUNCTIONS = {torch.bfloat16: "decode_attention_bf16", torch.float32: "decode_attention_f32"}


@functools.cache
def _library(name: str, fallback: str, also: tuple[str, ...] = (), link: tuple[str, ...] = (),
             mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL | None:
    """{name}.c (with the sources `also` beside it, and the linker flags `link`) built and loaded; None, with a
    warning that says what runs instead (`fallback`)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s", fallback)
        return None
    paths = [KERNELS / f"{source}.c" for source in (name, *also)]
    flags = [*FLAGS, *link]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in paths)
                         + " ".join([compiler, *flags, platform.node()]).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"{name}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, *map(str, paths), *link], check=True, capture_output=True,
                           timeout=120)
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", b"") or b""
            log.warning("cannot build model/kernels/%s.c (%s %s): %s", name, e, detail.decode(errors="replace")[:200],
                        fallback)
            return None
    return ctypes.CDLL(str(target), mode=mode)


@functools.cache
def decode_attention_kernel(dtype: torch.dtype):
    """`fn(q, k, v, k_cache, v_cache, host) -> out` for CPU tensors of `dtype`, or None when unavailable."""
    if dtype not in _FUNCTIONS:
        return None
    library = _library("decode_attention", "decode attention runs on SDPA")
    if library is None:
        return None
    fn = getattr(library, _FUNCTIONS[dtype])
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8 + [ctypes.c_float]

    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """q [B, Hkv, G, D]; k, v [B, Hkv, D], written at position len - 1 first; k_cache, v_cache [blocks, Hkv, S, D]
        with contiguous rows; host [B, W] int64 on the CPU: each row's len (0: a padding row), then its block
        table. Returns [B, Hkv, G, D]."""
        B, Hkv, G, D = q.shape
        if k_cache.stride() != v_cache.stride() or k_cache.stride()[2:] != (D, 1):
            raise ValueError("decode attention needs K and V caches with the same strides and contiguous rows")
        q, k, v, host = q.contiguous(), k.contiguous(), v.contiguous(), host.contiguous()
        out = torch.empty_like(q)
        fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
           host.data_ptr(), host.shape[1], B, Hkv, G, D, k_cache.shape[2], k_cache.stride(0), k_cache.stride(1),
           D ** -0.5)
        return out

    return decode_attention


def _has_avx512_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512_bf16"} <= set(flags.split())


@functools.cache
def packed_linear_kernel():
    """`fn(x, codes, high, scales, sub, bits, kind, out_features, out_dtype) -> y` for the layouts of
    packed_linear.c (x bfloat16 [M, K] on the CPU), or None where the kernel cannot run (no compiler, no AVX-512
    BF16)."""
    if not _has_avx512_bf16():
        return None
    library = _library("packed_linear", "linear layers stay dense")
    if library is None:
        return None
    fn = library.packed_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def packed_linear(x: torch.Tensor, codes: torch.Tensor, high: torch.Tensor, scales: torch.Tensor,
                      sub: torch.Tensor, bits: int, kind: int, out_features: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
        x = x.contiguous()
        M, K = x.shape
        out = torch.empty(M, out_features, dtype=out_dtype)
        status = fn(x.data_ptr(), M, K, out_features, bits, kind, codes.data_ptr(),
                    high.data_ptr() if high.numel() else None, scales.data_ptr(),
                    sub.data_ptr() if sub.numel() else None, out.data_ptr(), int(out_dtype == torch.float32))
        if status:
            raise ValueError(f"the packed linear kernel has no code for {bits}-bit weights of kind {kind}")
        return out

    return packed_linear


# The elementwise kernels once built (elementwise_kernels()): bfloat16 activations on the CPU use them then.
ELEMENTWISE: types.SimpleNamespace | None = None


@functools.cache
def elementwise_kernels() -> types.SimpleNamespace | None:
    """`rms_norm`, `silu_mul` and `rope` of elementwise.c (ctypes functions), or None where they cannot run (no
    compiler, no AVX-512 BF16). Building them sets ELEMENTWISE, which the model's layers check."""
    global ELEMENTWISE
    if not _has_avx512_bf16():
        return None
    library = _library("elementwise", "norms, rotary embeddings and SiLU run on torch's operators")
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    functions = {"rms_norm": ("rms_norm_bf16", [pointer] * 3 + [size] * 2 + [ctypes.c_float]),
                 "silu_mul": ("silu_mul_bf16", [pointer] * 2 + [size] * 2),
                 "rope": ("rope_bf16", [pointer, size] + [pointer] * 3 + [size] * 3)}
    kernels = {}
    for name, (symbol, argtypes) in functions.items():
        fn = getattr(library, symbol)
        fn.restype, fn.argtypes = None, argtypes
        kernels[name] = fn
    ELEMENTWISE = types.SimpleNamespace(**kernels)
    return ELEMENTWISE


# The entry points of compiled_ops.c, as Inductor's C++ wrapper declares them: one per op, named after it.
_COMPILED_OPS = {
    "packed_linear": "AOTITorchError aoti_torch_cpu_packed_linear(AtenTensorHandle x, AtenTensorHandle codes, "
                     "AtenTensorHandle high, AtenTensorHandle scales, AtenTensorHandle sub, int64_t bits, "
                     "int64_t kind, int64_t out_features, int64_t out_float, AtenTensorHandle* ret)",
    "decode_attention": "AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, "
                        "AtenTensorHandle v, AtenTensorHandle k_cache, AtenTensorHandle v_cache, "
                        "AtenTensorHandle tables, AtenTensorHandle* host, const char* impl, AtenTensorHandle* ret)",
    "rms_norm": "AOTITorchError aoti_torch_cpu_rms_norm(AtenTensorHandle x, AtenTensorHandle weight, double eps, "
                "AtenTensorHandle* ret)",
    "silu_mul": "AOTITorchError aoti_torch_cpu_silu_mul(AtenTensorHandle gate_up, AtenTensorHandle* ret)",
    "rope": "AOTITorchError aoti_torch_cpu_rope(AtenTensorHandle x, AtenTensorHandle cos, AtenTensorHandle sin, "
            "AtenTensorHandle* ret)",
}


@functools.cache
def compiled_op_entry_points() -> dict | None:
    """{op: [its C declaration]} for Inductor's `aot_inductor.custom_ops_to_c_shims`, with compiled_ops.c (and the
    kernels it calls) loaded so that a compiled step's C++ wrapper finds the functions: the ops then cost a C call
    each instead of a trip through Python. None where the kernels cannot run here."""
    kernels = decode_attention_kernel(torch.bfloat16), packed_linear_kernel(), elementwise_kernels()
    if any(kernel is None for kernel in kernels):
        return None
    lib = Path(torch.__file__).resolve().parent / "lib"  # the aoti_torch_* functions are libtorch_cpu's
    library = _library("compiled_ops", "compiled steps call the kernels through Python",
                       also=("packed_linear", "decode_attention", "elementwise"),
                       link=(f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"), mode=ctypes.RTLD_GLOBAL)
    if library is None:
        return None
    return {getattr(torch.ops.llama3, name).default: [declaration] for name, declaration in _COMPILED_OPS.items()}
