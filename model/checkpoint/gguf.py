"""Llama checkpoints in llama.cpp's GGUF format: a ModelConfig from the metadata, and a state dict
with Hugging Face tensor names, dequantised, from the tensors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from model.checkpoint.gguf_blocks import PACKED_TYPES, decode
from model.checkpoint.gguf_cache import cache_file, read_cache, source_stamp, write_cache
from model.checkpoint.gguf_file import GGUFFile, GGUFTensorInfo
from model.config import ModelConfig, RopeScaling
from model.quant import PackedWeight

log = logging.getLogger(__name__)

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's precomputed Llama 3 frequency divisors; goes into the config
_REQUIRED = object()


@functools.cache
def readable(qtype: Q) -> bool:
    """Whether the `gguf` package can dequantise tensors of this type (it reads nearly every type llama.cpp
    writes: the legacy, K- and IQ quants; not the integer and Q8_1/Q8_K intermediate types)."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return True
    try:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def config_from_gguf(path_or_reader: str | PathLike | GGUFFile | gguf.GGUFReader) -> ModelConfig:
    """The ModelConfig of a llama GGUF file, given its path, a GGUFFile or a `gguf.GGUFReader`."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        reader = path_or_reader
        tensors = {t.name: t for t in reader.tensors}
        freqs = tensors.get(ROPE_FREQS)
        rope_freqs = None if freqs is None else gguf.quants.dequantize(freqs.data, freqs.tensor_type)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        return _config(metadata, tensors.keys(), rope_freqs, name=Path(reader.data.filename).stem)
    file = path_or_reader if isinstance(path_or_reader, GGUFFile) else GGUFFile(path_or_reader)
    freqs = file.tensors.get(ROPE_FREQS)
    rope_freqs = None if freqs is None else _dequantize(file, freqs).numpy()
    return _config(file.metadata, file.tensors.keys(), rope_freqs, name=file.path.stem)


def _config(metadata: Mapping[str, Any], tensor_names, rope_freqs: np.ndarray | None, name: str) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported architecture {arch!r}: only 'llama' GGUF files are supported")

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks 'llama.{key}'")
        if isinstance(value, list):
            raise ValueError(f"'llama.{key}' varies per layer ({value[:4]}...), which is not supported")
        return value

    if get("expert_count", 0):
        raise ValueError("mixture-of-experts llama GGUF files (e.g. Mixtral) are not supported")
    vocab_size = get("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens", ()))
    if not vocab_size:
        raise ValueError("GGUF metadata gives no vocabulary size (neither 'llama.vocab_size' "
                         "nor 'tokenizer.ggml.tokens')")
    # key_length is the head size; rope.dimension_count is how much of it rotates, which must be all.
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None)
    for key in ("rope.dimension_count", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise ValueError(f"'llama.{key}' is {get(key)} but the head size is {head_dim}: "
                             "partial rotary embeddings and unequal key/value sizes are not supported")
    heads = get("attention.head_count")
    head_dim = head_dim or get("embedding_length") // heads
    rope_theta = float(get("rope.freq_base", 10_000.0))
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=get("embedding_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        intermediate_size=get("feed_forward_length"),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(metadata, rope_freqs, rope_theta, head_dim),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        name=name,
    )


def _rope_scaling(metadata: Mapping[str, Any], rope_freqs: np.ndarray | None, theta: float,
                  head_dim: int) -> RopeScaling | None:
    # llama.cpp writes Llama 3 scaling only as the rope_freqs tensor; the rope.scaling.* keys describe
    # the other kinds (linear, YaRN, LongRoPE), which our rotary embedding does not implement.
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor", 1.0)
    if kind not in ("none", "") and not (kind == "linear" and factor == 1.0):
        raise ValueError(f"unsupported rope scaling type {kind!r} (factor {factor}): only Llama 3 "
                         f"scaling, stored as {ROPE_FREQS!r}, is supported")
    return None if rope_freqs is None else _fit_llama3_scaling(rope_freqs, theta, head_dim)


def _llama3_divisors(scaling: RopeScaling, inv_wavelength: np.ndarray) -> np.ndarray:
    """What each rotary frequency is divided by: 1 for short wavelengths, `factor` for long ones, a ramp between."""
    ratio = scaling.original_max_position_embeddings * inv_wavelength  # context length / wavelength
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / scaling.factor + smooth)


def _fit_llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> RopeScaling | None:
    """Recover RopeScaling from llama.cpp's per-frequency divisors.

    On the ramp, smooth = (orig / wavelength - low) / (high - low) is linear in 1 / wavelength, so two
    ramp points give it. Scaling orig, low and high together changes no divisor, so low = 1 loses
    nothing. The result is checked by recomputing every divisor."""
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)  # [head_dim / 2]
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"{ROPE_FREQS!r} has {divisors.size} values, expected head_dim / 2 = {head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    inv_wavelength = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)  # [head_dim / 2]
    factor = float(divisors.max())
    ramp = (divisors > 1.0 + 1e-4) & (divisors < factor * (1.0 - 1e-4))
    try:
        if ramp.sum() >= 2:
            smooth = (factor / divisors[ramp] - 1.0) / (factor - 1.0)
            slope, intercept = np.polyfit(inv_wavelength[ramp], smooth, 1)
            high = 1.0 - 1.0 / intercept  # intercept = -low / (high - low), with low = 1
            scaling = RopeScaling(factor=round(factor, 4), low_freq_factor=1.0, high_freq_factor=round(high, 3),
                                  original_max_position_embeddings=round(slope * (high - 1.0)))
        else:  # too few ramp points to fit: assume Llama 3.1's ramp, and let the check below judge
            scaling = RopeScaling(factor=round(factor, 4))
        fits = np.allclose(_llama3_divisors(scaling, inv_wavelength), divisors, rtol=1e-3)
    except (ValueError, OverflowError, ZeroDivisionError):  # a fit that is not even a valid RopeScaling
        fits = False
    if not fits:
        raise ValueError(f"{ROPE_FREQS!r} does not follow Llama 3 frequency scaling, the only kind supported")
    return scaling


def _tensor_plan(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """GGUF name -> (Hugging Face name, torch shape, heads whose rotary rows to un-permute, or None)."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    plan = {"token_embd.weight": ("model.embed_tokens.weight", (v, h), None)}
    for i in range(cfg.num_hidden_layers):
        g, m = f"blk.{i}.", f"model.layers.{i}."
        plan.update({
            g + "attn_norm.weight": (m + "input_layernorm.weight", (h,), None),
            g + "attn_q.weight": (m + "self_attn.q_proj.weight", (q, h), cfg.num_attention_heads),
            g + "attn_k.weight": (m + "self_attn.k_proj.weight", (kv, h), cfg.num_key_value_heads),
            g + "attn_v.weight": (m + "self_attn.v_proj.weight", (kv, h), None),
            g + "attn_output.weight": (m + "self_attn.o_proj.weight", (h, q), None),
            g + "ffn_norm.weight": (m + "post_attention_layernorm.weight", (h,), None),
            g + "ffn_gate.weight": (m + "mlp.gate_proj.weight", (f, h), None),
            g + "ffn_up.weight": (m + "mlp.up_proj.weight", (f, h), None),
            g + "ffn_down.weight": (m + "mlp.down_proj.weight", (h, f), None),
        })
    plan["output_norm.weight"] = ("model.norm.weight", (h,), None)
    if not cfg.tie_word_embeddings:
        plan["output.weight"] = ("lm_head.weight", (v, h), None)
    return plan


def check_tensor_table(file: GGUFFile) -> None:
    """The file's tensors are the config's, with their shapes and types this server can read; else a ValueError
    naming the file, the tensor and what is wrong with it."""
    _check_tensors(file, _tensor_plan(config_from_gguf(file)))


def _check_tensors(file: GGUFFile, plan: Mapping[str, tuple[str, tuple[int, ...], int | None]]) -> None:
    """Every problem with the tensor table is reported before anything is dequantised."""
    for name in file.tensors:
        if name not in plan and name != ROPE_FREQS:
            raise ValueError(f"unexpected tensor {name!r} in {file.path}: not part of a Llama model")
    for name, (hf_name, shape, _) in plan.items():
        info = file.tensors.get(name)
        if info is None:
            raise ValueError(f"tensor {name!r} ({hf_name}) is missing from {file.path}")
        if info.shape != shape:
            raise ValueError(f"tensor {name!r} ({hf_name}) has shape {list(info.shape)}, "
                             f"the config needs {list(shape)}")
        if not readable(info.qtype):
            raise ValueError(f"{file.path}: tensor {name!r} has type {info.type_name}, which this server cannot "
                             "read")


def _dequantize(file: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    if not readable(info.qtype):
        raise ValueError(f"{file.path}: tensor {info.name!r} has type {info.type_name}, which this server cannot read")
    values = gguf.quants.dequantize(file.tensor_bytes(info), info.qtype)  # float32 [*info.shape]
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file map
        values = values.copy()
    file.release(info)
    return torch.from_numpy(values)


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head it interleaves the two rotary halves
    (rows 0, d/2, 1, d/2+1, ...) for GPT-J-style rotation; ours rotates split halves as Hugging Face does."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    # [n_heads, half, 2, cols] -> [n_heads, 2, half, cols] -> [rows, cols]
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _converted(file: GGUFFile, dtype: torch.dtype, skip: frozenset[str] = frozenset()
               ) -> tuple[dict[str, tuple[int, ...]], Iterator[tuple[str, torch.Tensor]]]:
    """The state dict's layout (HF name -> shape), and its tensors converted one at a time, so that only
    one tensor exists in two forms at once; the HF names in `skip` are left out. The file is checked before
    this returns."""
    plan = _tensor_plan(config_from_gguf(file))
    _check_tensors(file, plan)
    plan = {name: entry for name, entry in plan.items() if entry[0] not in skip}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, (hf_name, _, rotary_heads) in plan.items():
            w = _dequantize(file, file.tensors[name]).to(dtype)
            yield hf_name, w if rotary_heads is None else _unpermute_rotary(w, rotary_heads)

    return {hf_name: shape for hf_name, shape, _ in plan.values()}, tensors()


def load_gguf_state_dict(path: str | PathLike, dtype: torch.dtype = torch.float32, *,
                         skip: frozenset[str] = frozenset(), cache_dir: str | PathLike | None = None,
                         use_cache: bool = True) -> dict[str, torch.Tensor]:
    """The weights of a llama GGUF file as a Hugging Face-named state dict of `dtype` tensors, but for the names in
    `skip` (the weights served packed, as stored).

    Dequantising takes over a second for a 135M model, so the result is kept as a safetensors file under `cache_dir`
    (default `$LLAMA3_SERVER_CACHE` or ~/.cache/llama3-server) and memory-mapped on later loads.
    The cache is written while converting, so the weights are never held twice in memory."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if not use_cache:
        return dict(_converted(GGUFFile(path), dtype, skip)[1])
    try:
        target, stamp = cache_file(path, dtype, cache_dir, skip), source_stamp(path, dtype, skip)
    except OSError as e:
        raise ValueError(f"cannot read {path} as a GGUF file: {e}") from None
    if (cached := read_cache(target, stamp)) is not None:
        return cached
    file = GGUFFile(path)
    layout, tensors = _converted(file, dtype, skip)
    try:
        write_cache(target, stamp, layout, tensors)
        if (cached := read_cache(target, stamp)) is not None:
            return cached
    except OSError as e:
        log.warning("cannot write the weight cache %s (%s); loading without it", target, e)
    return dict(_converted(file, dtype, skip)[1])


def gguf_packed_names(file: GGUFFile) -> frozenset[str]:
    """The HF names of the weights a GGUF file stores in a type served packed (PACKED_TYPES)."""
    plan = _tensor_plan(config_from_gguf(file))
    return frozenset(hf_name for name, (hf_name, shape, _) in plan.items()
                     if len(shape) == 2 and name in file.tensors and file.tensors[name].qtype in PACKED_TYPES)


def gguf_packed_weights(path: str | PathLike) -> Iterator[tuple[str, PackedWeight]]:
    """The weights of a GGUF file stored in a type served packed (PACKED_TYPES), exactly as stored, one at a time:
    (HF name, PackedWeight), Q/K rows un-permuted like the dequantised weights."""
    file = GGUFFile(path)
    plan = _tensor_plan(config_from_gguf(file))
    _check_tensors(file, plan)
    names = gguf_packed_names(file)
    for name, (hf_name, _, rotary_heads) in plan.items():
        if hf_name not in names:
            continue
        info = file.tensors[name]
        weight = decode(file.tensor_bytes(info), info.qtype)
        file.release(info)
        if rotary_heads is not None:
            weight = weight.rows(_unpermute_rotary(torch.arange(weight.codes.shape[0])[:, None], rotary_heads)[:, 0])
        yield hf_name, weight
        del weight  # before the next is decoded: the caller may have let go of its own reference


def gguf_tensor_types(path: str | PathLike) -> dict[str, str]:
    """HF name -> GGUF type name of every tensor, for the start-up log."""
    file = GGUFFile(path)
    plan = _tensor_plan(config_from_gguf(file))
    return {hf_name: file.tensors[name].type_name for name, (hf_name, _, _) in plan.items() if name in file.tensors}
