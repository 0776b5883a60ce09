"""Build a `Llama` from a checkpoint: a local Hugging Face directory, a Hub repo id, or a GGUF file.

Weights are streamed one tensor at a time from mmapped files into a model built on the meta device, so
a checkpoint never sits in memory twice.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.config import ModelConfig
from model.kernels.cpu import packed_linear_kernel
from model.llama import Llama
from model.memory import gather_on_huge_pages, trim_heap
from model.parallel import Shard, check_split, float_partials, shard_packed, shard_tensor
from model.quant import (
    QUANTIZATIONS,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    fuse,
    quantize_model,
)

if TYPE_CHECKING:
    from model.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Bytes of temporaries freed between two trims of the heap while loading (model/memory.trim_heap): each trim costs
# a few milliseconds and the pages it returns are faulted in again by the next tensors.
TRIM_EVERY = 256 << 20

# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: "Tokenizer"
    config: ModelConfig
    source: str
    load_seconds: float
    quantization: str = "none"


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                max_seq_len: int | None = None, packed: Iterable[tuple[str, PackedWeight]] = (),
                shard: Shard = Shard()) -> Llama:
    """Assign named checkpoint tensors into a meta-device `Llama`, checking every name and shape. Weights in
    `packed` become packed layers as they come (a packed embedding is read by row, and shared by a tied head),
    so no dense copy of them is ever made. `shard`: keep only this rank's part of each tensor, cut as it comes
    (model/parallel.py)."""
    dtype = dtype or default_dtype(device)
    check_split(config, shard.size)
    with torch.device("meta"):
        model = Llama(config, max_seq_len=max_seq_len, shard=shard)
    expected = dict(model.named_parameters())  # a tied head is not listed twice
    seen, unpacked = set(), 0
    for name, weight in packed:
        weight = shard_packed(name, weight, config, shard)
        if name not in expected or tuple(weight.codes.shape) != tuple(expected[name].shape):
            raise ValueError(f"packed weight {name!r} {tuple(weight.codes.shape)} does not fit the model")
        parent, _, _ = name.rpartition(".")
        if name == "model.embed_tokens.weight":
            table = PackedLinear.from_weight(weight, out_float=True)
            model.model.embed_tokens = PackedEmbedding(table, dtype)
            if config.tie_word_embeddings:
                model.lm_head = table
        else:
            module = PackedLinear.from_weight(weight, out_float=name == "lm_head.weight")
            grand, _, leaf = parent.rpartition(".")
            setattr(model.get_submodule(grand) if grand else model, leaf, module)
        seen.add(name)
        unpacked += weight.codes.nbytes
        del weight
        if unpacked > TRIM_EVERY:  # the unpacked codes freed go back to the OS: else loading peaks far above them
            trim_heap()
            unpacked = 0
    for name, tensor in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name not in expected:
            raise ValueError(f"checkpoint tensor {name!r} is not part of a Llama model")
        tensor = shard_tensor(name, tensor, config, shard)
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {want}")
        parent, _, leaf = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(model.get_submodule(parent), leaf, param)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    if not isinstance(model.model.embed_tokens, PackedEmbedding):
        model.tie_weights()
    model.reset_rope(device)
    _float_partials(model)
    return model.eval()


def _float_partials(model: Llama) -> None:
    """A split model's row-parallel packed layers give float32 partial sums (added over the ranks in float32)."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and float_partials(name, model.shard):
            module.out_float = True


def read_directory(directory: Path) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, torch.Tensor]]]:
    from model.checkpoint.safetensors import iter_safetensors, safetensors_files
    from model.text.tokenizer import Tokenizer

    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    config = ModelConfig.from_json_file(directory / "config.json", name=directory.name)
    return config, Tokenizer.from_directory(directory), iter_safetensors(safetensors_files(directory))


def read_gguf(path: Path, dtype: torch.dtype, pack: bool
              ) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, torch.Tensor]], Iterator[tuple[str, PackedWeight]]]:
    """A GGUF file's config, vocabulary, dense tensors and, when `pack`, the weights served packed as stored."""
    from model.checkpoint.gguf import (
        check_tensor_table,
        config_from_gguf,
        gguf_packed_names,
        gguf_packed_weights,
        load_gguf_state_dict,
    )
    from model.checkpoint.gguf_file import GGUFFile
    from model.text.tokenizer import Tokenizer

    header = GGUFFile(path)  # parsed once, for the config, the tensor table and the vocabulary
    config = config_from_gguf(header)
    check_tensor_table(header)  # names, shapes and types, before anything is read
    packed_names = gguf_packed_names(header) if pack else frozenset()
    # Dequantised straight to the serving dtype, so the cached copy needs no conversion at the next start.
    dense = load_gguf_state_dict(path, dtype, skip=packed_names)
    return (config, Tokenizer.from_gguf(header.metadata), iter(dense.items()),
            gguf_packed_weights(path) if pack else iter(()))


def load(source: str | Path | None = None, *, device: torch.device | str = "cpu",
         dtype: torch.dtype | None = None, max_seq_len: int | None = None,
         revision: str | None = None, quantization: str = "none", shard: Shard = Shard()) -> LoadedModel:
    """Load a model by what `source` names: None (the embedded default), a .gguf file, a directory, a repo id.

    `quantization`: "none" keeps every weight dense in `dtype`; "auto" serves a GGUF's tensors of the packed types
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) exactly as stored, on CPU, and quantises nothing else;
    "int4" and "int8" also quantise the other float weights of linear layers at load to that many bits (CPU).
    `shard`: load only this tensor-parallel rank's part of the weights (model/parallel.py)."""
    from model.checkpoint.hub import looks_like_repo_id, resolve_repo
    from model.paths import default_gguf_path

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if quantization in ("int4", "int8") and torch.device(device).type != "cpu":
        raise ValueError(f"--quantization {quantization} runs on CPU kernels; on a GPU use --quantization none")
    start = time.perf_counter()
    pack = quantization != "none" and torch.device(device).type == "cpu"
    if pack and packed_linear_kernel() is None:
        log.warning("no packed linear kernel on this machine (it needs a C compiler and AVX-512 BF16): weights "
                    "stay dense")
        pack, quantization = False, "none"
    path = Path(source) if source is not None else default_gguf_path()
    packed: Iterator[tuple[str, PackedWeight]] = iter(())
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file; pass a .gguf file, a model directory or a Hub repo id")
        config, tokenizer, tensors, packed = read_gguf(path, dtype or default_dtype(device), pack)
    elif path.is_dir():
        config, tokenizer, tensors = read_directory(path)
    elif looks_like_repo_id(str(source)):
        config, tokenizer, tensors = read_directory(resolve_repo(str(source), revision=revision))
    else:
        raise ValueError(f"model {str(source)!r} is neither a file, a directory nor a Hugging Face repo id")
    model = build_model(config, tensors, device=device, dtype=dtype, max_seq_len=max_seq_len, packed=packed,
                        shard=shard)
    if pack:
        _quantize(model, {"int4": 4, "int8": 8}.get(quantization), path if path.is_file() else None)
        _float_partials(model)
        gather_on_huge_pages([m for m in model.modules() if isinstance(m, PackedLinear)],
                             ("codes", "high", "scales", "sub"))
    if quantization == "auto":
        quantization = "packed" if any(isinstance(m, PackedLinear) for m in model.modules()) else "none"
    return_freed_memory()
    return LoadedModel(model, tokenizer, config, str(source if source is not None else path),
                       time.perf_counter() - start, quantization)


def return_freed_memory() -> None:
    """Hand what was freed back to the OS: glibc keeps freed heap pages (after compiling, say), and the process's
    resident memory would stay that much above what it uses."""
    gc.collect()
    trim_heap()


def _names(model: nn.Module, *modules: nn.Module) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(m), "") for m in modules]


def _quantize(model: Llama, bits: int | None, gguf_path: Path | None) -> None:
    """Float weights quantised to `bits` (None: kept dense) beside the layers already packed as stored; q/k/v and
    gate/up fused where they share a format. A float output head is quantised to 8 bits at most: at 4 (groups of
    32) it changed too many next-token choices (see the README)."""
    from model.checkpoint.gguf import gguf_tensor_types

    done = {name: f"{m.bits}-bit as stored" for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    done |= quantize_model(model, None, bits, only={name for name, m in model.named_modules()
                                                    if isinstance(m, nn.Linear) and name != "lm_head"})
    done |= quantize_model(model, None, 8 if bits else None, only={"lm_head"})
    for block in model.model.layers:
        attention, mlp = block.self_attn, block.mlp
        if all(name in done for name in _names(model, attention.q_proj, attention.k_proj, attention.v_proj)):
            attention.qkv_proj = fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        if all(name in done for name in _names(model, mlp.gate_proj, mlp.up_proj)):
            mlp.gate_up_proj = fuse([mlp.gate_proj, mlp.up_proj])
        trim_heap()  # what fusing copied from
    kinds: dict[str, int] = {}
    for how in done.values():
        kinds[how] = kinds.get(how, 0) + 1
    summary = ", ".join(f"{count} {how}" for how, count in sorted(kinds.items()))
    dense = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    types = gguf_tensor_types(gguf_path) if gguf_path is not None else {}
    dense_types = sorted({types[f"{name}.weight"] for name in dense if f"{name}.weight" in types})
    log.info("packed linear layers: %s; %d left dense%s", summary or "none", len(dense),
             f" (stored as {', '.join(dense_types)}: no exact packed form)" if dense_types else "")
