"""Engine limits and placement, checked once at start-up."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from model.quant import QUANTIZATIONS

DEFAULT_KV_CACHE_MEMORY = 4 * 2**30  # bytes, off CUDA when --kv-cache-memory is not given
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # on CUDA when --kv-cache-memory is not given (vLLM's default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """A size as people write it: 1073741824, 1GiB, 1.5G, 512MiB, 800MB (decimal and binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in UNITS:
        raise ValueError(f"not a size: {text!r} (write bytes, or a number with a unit such as 512MiB or 4GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass
class EngineConfig:
    model: str | None = None              # None: the embedded SmolLM2-135M-Instruct GGUF
    device: str = "cpu"
    dtype: str | None = None              # None: bfloat16 (float32 is the exact-parity choice)
    quantization: str = "auto"            # auto: a GGUF's 4/8-bit tensors as stored on CPU; none; int4; int8
    enforce_eager: bool = False           # True: no compiled decode step (what the parity tests compare with)
    max_model_len: int = 2048             # prompt + output tokens of one sequence (a limit, not a reservation)
    max_num_seqs: int = 32                # sequences running at once
    block_size: int = 16                  # tokens per KV cache block
    kv_cache_memory: int | None = None    # bytes for the KV cache (None: see cache_budget.kv_cache_blocks)
    gpu_memory_utilization: float | None = None  # on CUDA: the fraction of the device this process may use
    max_num_batched_tokens: int = 512     # tokens in one forward pass (decodes + prefill chunks)
    max_waiting: int = 512                # sequences queued before new requests are refused
    max_waiting_tokens: int = 262_144     # prompt tokens queued before new requests are refused
    request_timeout: float | None = None  # seconds a request may take, queue to last token (None: no limit)
    seed: int = 0                         # for requests that give no seed
    enable_prefix_caching: bool = True    # a new prompt maps its leading full blocks onto cached ones

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_waiting_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs, so every running "
                             "sequence can decode in each step")
        torch.device(self.device)  # raises on a malformed device string
        if self.quantization in ("int4", "int8") and torch.device(self.device).type != "cpu":
            raise ValueError(f"--quantization {self.quantization} runs on CPU kernels; on a GPU use --quantization none")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "bfloat16"]
