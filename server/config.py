"""Engine limits and placement, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.quant import QUANTIZATIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None              # None: the embedded SmolLM2-135M-Instruct GGUF
    device: str = "cpu"
    dtype: str | None = None              # None: bfloat16 (float32 is the exact-parity choice)
    quantization: str = "auto"            # auto: a GGUF's 4/8-bit tensors as stored on CPU; none; int4; int8
    enforce_eager: bool = False           # True: no compiled decode step (what the parity tests compare with)
    max_model_len: int = 2048             # prompt + output tokens of one sequence; the KV slot's length
    max_num_seqs: int = 32                # sequences running at once; the number of KV slots
    max_num_batched_tokens: int = 512     # tokens in one forward pass (decodes + prefill chunks)
    max_waiting: int = 512                # sequences queued before new requests are refused
    max_waiting_tokens: int = 262_144     # prompt tokens queued before new requests are refused
    request_timeout: float | None = None  # seconds a request may take, queue to last token (None: no limit)
    seed: int = 0                         # for requests that give no seed
    enable_prefix_caching: bool = True    # a new prompt reuses the K/V a freed slot holds for its prefix

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_waiting_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
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
