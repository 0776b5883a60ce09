"""The engine's settings: limits and placement, checked once at start-up.

Each field is an option of `python -m server`: its help, choices and default are stated here once, and the CLI
(server/cli.py) and YAML presets (configs/) are generated from and checked against these fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from model.quant import QUANTIZATIONS
from server.engine.speculation import SpeculativeConfig

DEFAULT_KV_CACHE_MEMORY = 4 * 2**30  # bytes, off CUDA when --kv-cache-memory is not given
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # on CUDA when --kv-cache-memory is not given (vLLM's default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
         "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def option(default: Any, help: str, *, choices: tuple | None = None, shown: str | None = None, flag: str | None = None,
           metavar: str | None = None, repeat: bool = False, factory: Any = None) -> Any:
    """A config field that is also a command-line option: `help` without its default (added from `default`, or
    `shown` where the default needs words), `choices` when the values are few, `flag` when the option is not
    spelled --field-name, `repeat` for an option given once per value."""
    metadata = {"help": help, "choices": choices, "shown": shown, "flag": flag, "metavar": metavar, "repeat": repeat}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
    model: str | None = option(None, "a .gguf file, a Hugging Face model directory or a Hub repo id",
                               shown="the embedded SmolLM2-135M-Instruct")
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    dtype: str = option("bfloat16", "activations, dense weights and KV cache (float32 for exact parity)",
                        choices=tuple(DTYPES))
    quantization: str = option("auto", "auto: a GGUF's Q4_0/Q4_1/Q8_0 tensors stay packed on CPU; none: dense "
                               "weights; int4, int8: also quantise float weights at load (CPU; the output head to 8 "
                               "bits at most)", choices=QUANTIZATIONS)
    enforce_eager: bool = option(False, "run the decode step eagerly instead of compiling it")
    compile_in_background: bool = option(True, "serve as soon as the model is loaded, decoding eagerly while the "
                                         "decode step compiles (CPU; the same outputs bit for bit); with "
                                         "speculation or tensor parallelism it compiles before serving")
    max_model_len: int = option(2048, "tokens per sequence, prompt and output; a limit, not a reservation: the KV "
                                "cache is sized by --kv-cache-memory")
    max_num_seqs: int = option(32, "sequences decoding at once")
    kv_cache_memory: int | str | None = option(
        None, "memory for the KV cache, e.g. 1GiB or 512MiB", shown="room for --max-num-seqs sequences at "
        "--max-model-len, at most 4GiB; on CUDA see --gpu-memory-utilization")
    gpu_memory_utilization: float | None = option(
        None, "on CUDA without --kv-cache-memory: the fraction of the device's memory this server may use, weights "
        "and activations included; the KV cache gets what is left after loading the weights and a warm-up pass "
        "(as vLLM)", shown=str(DEFAULT_GPU_MEMORY_UTILIZATION))
    block_size: int = option(16, "tokens per KV cache block")
    max_num_batched_tokens: int = option(512, "tokens per forward pass (decodes and prefill chunks)")
    max_waiting: int = option(512, "queued sequences before requests get 503")
    max_waiting_tokens: int = option(262_144, "queued prompt tokens before requests get 503")
    request_timeout: float | None = option(
        None, "seconds a request may take from arrival to its last token, queue and prefill included; a request "
        "can set its own with the X-Request-Timeout header", shown="no limit")
    seed: int = option(0, "seed of the sampler's generator, which requests that give no seed draw from: for a fixed "
                       "seed, the same requests sent one after another sample the same tokens")
    enable_prefix_caching: bool = option(True, "map a new prompt's leading full blocks onto cached ones")
    tensor_parallel_size: int = option(
        1, "split the model over this many ranks (tensor parallelism over torch.distributed: one CUDA device each "
        "with NCCL, or CPU processes with gloo); on one host the server starts the other ranks itself, across hosts "
        "torchrun starts every rank (see the README)")
    speculative_config: str | None = option(
        None, "speculative decoding, as vLLM's JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": K, "
        "\"prompt_lookup_max\": N, \"prompt_lookup_min\": M} (proposals from the request's own tokens) or "
        "{\"method\": \"draft_model\", \"model\": PATH_OR_REPO, \"num_speculative_tokens\": K} (a smaller model "
        "with the same vocabulary), verified in the decode step: outputs unchanged; each step gets the proposals that "
        "pay by its measured cost and acceptance; optional \"max_rows\": decode rows per step, proposals included, "
        "at most (default 8)", shown="off")

    def __post_init__(self):
        if self.dtype not in DTYPES:
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
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError("with --tensor-parallel-size, pass --device cuda: rank r uses CUDA device r "
                             "(CUDA_VISIBLE_DEVICES chooses which)")
        if self.speculative_config is not None:
            spec = SpeculativeConfig.parse(self.speculative_config)  # raises, naming the problem
            if spec.method == "draft_model" and self.tensor_parallel_size > 1:
                raise ValueError("a draft model is not supported with --tensor-parallel-size > 1 yet; use ngram")
        if self.quantization in ("int4", "int8") and torch.device(self.device).type != "cpu":
            raise ValueError(f"--quantization {self.quantization} runs on CPU kernels; on a GPU use --quantization none")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def speculation(self) -> SpeculativeConfig | None:
        return None if self.speculative_config is None else SpeculativeConfig.parse(self.speculative_config)
