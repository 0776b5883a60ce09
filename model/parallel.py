"""Tensor parallelism (Megatron's split) over torch.distributed: which slice of each weight a rank holds, and the
two collectives a forward pass needs.

Rank r of N holds:
  q_proj           the rows of query heads [r H/N, (r+1) H/N)                       (column-parallel)
  k_proj, v_proj   the rows of KV heads [r Hkv/N, (r+1) Hkv/N); when N > Hkv, the one KV head its queries use
  o_proj           the columns of its query heads                                    (row-parallel, then all-reduce)
  gate/up_proj     rows [r I/N, (r+1) I/N)                                           (column-parallel)
  down_proj        the same columns                                                  (row-parallel, then all-reduce)
  embed_tokens     vocabulary rows [r V', (r+1) V'), V' = V/N rounded up to 16, the last padded with zeros; a row
                   outside a rank's range embeds as zeros there, and an all-reduce adds the one rank's row to zeros
  lm_head          the same vocabulary rows; the ranks' logits are all-gathered (below)
  norms            whole, on every rank
A packed weight is cut on its groups' boundaries (32 inputs, 256 for K-quants), so a rank's codes and scales are
exactly the full weight's. Row-parallel packed layers give float32 partial sums, all-reduced in float32 and only
then rounded to the activations' dtype, as the whole layer rounds once.

The logits are all-gathered rather than gathered to rank 0: PyTorch's process groups gather into one rank only as a
list of tensors, the all-gather fills one tensor and costs rank 0 the same bytes, and every rank then runs the same
graph. Only rank 0 samples.

The collectives are ops of our own library (`llama3::all_reduce`, `llama3::all_gather`) that call torch.distributed
on the default process group: Inductor's C++ wrapper cannot call PyTorch's functional collectives on CPU (torch
2.13), and it calls these like any other op, so the compiled decode step holds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.config import ModelConfig

VOCAB_ALIGN = 16  # a rank's vocabulary rows are a multiple of this: the packed kernel's tile


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`; `Shard(0, 1)` is the whole model."""

    rank: int = 0
    size: int = 1

    @property
    def split(self) -> bool:
        return self.size > 1


def check_split(config: ModelConfig, size: int) -> None:
    """Raise, naming the reason, when the model cannot be split over `size` ranks."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    H, Hkv, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if H % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide the model's {H} attention heads")
    if Hkv % size and size % Hkv:
        raise ValueError(f"--tensor-parallel-size {size} neither divides nor is a multiple of the model's {Hkv} "
                         "key/value heads")
    if I % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide the model's intermediate size {I}")


def local_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The decoder layers' shapes on one rank: its heads and its slice of the feed-forward (the vocabulary and the
    hidden size stay whole; see `vocab_rows`)."""
    if not shard.split:
        return config
    check_split(config, shard.size)
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // shard.size,
                               num_key_value_heads=max(1, config.num_key_value_heads // shard.size),
                               intermediate_size=config.intermediate_size // shard.size, head_dim=config.head_dim)


def vocab_rows(vocab: int, shard: Shard) -> tuple[int, int, int]:
    """(first, end, rows): the vocabulary ids [first, end) this rank holds, in a table of `rows` rows (the rest
    zero padding)."""
    if not shard.split:
        return 0, vocab, vocab
    rows = -(-vocab // (shard.size * VOCAB_ALIGN)) * VOCAB_ALIGN
    first = min(vocab, shard.rank * rows)
    return first, min(vocab, first + rows), rows


def _kv_heads(config: ModelConfig, shard: Shard) -> tuple[int, int]:
    """The KV heads [first, end) this rank holds."""
    Hkv = config.num_key_value_heads
    if Hkv >= shard.size:
        per = Hkv // shard.size
        return shard.rank * per, (shard.rank + 1) * per
    head = shard.rank * Hkv // shard.size  # the KV head of this rank's query heads
    return head, head + 1


def weight_slice(name: str, config: ModelConfig, shard: Shard) -> tuple[int, int, int] | None:
    """How the checkpoint weight `name` is cut for this rank: (dim, start, end) along dim 0 (output rows) or 1
    (input columns); None for a weight every rank holds whole. The vocabulary's tables are cut by `vocab_rows`."""
    if not shard.split:
        return None
    D, r, n = config.head_dim, shard.rank, shard.size
    H, I = config.num_attention_heads, config.intermediate_size
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    if leaf == "q_proj":
        return 0, r * H // n * D, (r + 1) * H // n * D
    if leaf in ("k_proj", "v_proj"):
        first, end = _kv_heads(config, shard)
        return 0, first * D, end * D
    if leaf == "o_proj":
        return 1, r * H // n * D, (r + 1) * H // n * D
    if leaf in ("gate_proj", "up_proj"):
        return 0, r * I // n, (r + 1) * I // n
    if leaf == "down_proj":
        return 1, r * I // n, (r + 1) * I // n
    return None


VOCAB_TABLES = ("model.embed_tokens.weight", "lm_head.weight")
ROW_PARALLEL = ("o_proj", "down_proj")


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a dense checkpoint tensor (a view where no padding is needed: a slice of an mmapped file
    reads only its own bytes when it is copied)."""
    if not shard.split:
        return tensor
    if name in VOCAB_TABLES:
        first, end, rows = vocab_rows(config.vocab_size, shard)
        return torch.cat([tensor[first:end], tensor.new_zeros(rows - (end - first), *tensor.shape[1:])])
    cut = weight_slice(name, config, shard)
    # a copy, so that the whole tensor it was cut from can be freed
    return tensor if cut is None else tensor.narrow(cut[0], cut[1], cut[2] - cut[1]).clone()


def shard_packed(name: str, weight, config: ModelConfig, shard: Shard):
    """This rank's part of a packed weight (model.quant.PackedWeight), cut on group boundaries."""
    if not shard.split:
        return weight
    if name in VOCAB_TABLES:
        first, end, rows = vocab_rows(config.vocab_size, shard)
        return weight.row_range(first, end, pad_to=rows)
    cut = weight_slice(name, config, shard)
    if cut is None:
        return weight
    dim, start, end = cut
    return weight.row_range(start, end) if dim == 0 else weight.column_range(start, end)


def float_partials(name: str, shard: Shard) -> bool:
    """Whether the layer named `name` (a module name) gives float32 partial sums for an all-reduce."""
    return shard.split and name.rsplit(".", 1)[-1] in ROW_PARALLEL


# --- collectives -------------------------------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out)
    return out


def _all_gather(x: torch.Tensor, world: int) -> torch.Tensor:
    out = x.new_empty(world * x.shape[0], *x.shape[1:])
    dist.all_gather_single(out, x.contiguous())
    return out


_library = torch.library.Library("llama3", "FRAGMENT")
_library.define("all_reduce(Tensor x) -> Tensor")
_library.define("all_gather(Tensor x, int world) -> Tensor")
_library.impl("all_reduce", _all_reduce, "CompositeExplicitAutograd")
_library.impl("all_gather", _all_gather, "CompositeExplicitAutograd")


@torch.library.register_fake("llama3::all_reduce")
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("llama3::all_gather")
def _(x, world):
    return x.new_empty(world * x.shape[0], *x.shape[1:])


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks (a new tensor)."""
    if torch.compiler.is_compiling():
        return torch.ops.llama3.all_reduce.default(x)
    return _all_reduce(x)


def gather_vocab(logits: torch.Tensor, vocab: int, shard: Shard) -> torch.Tensor:
    """[M, rows] logits of this rank's vocabulary rows -> [M, vocab], every rank's side by side."""
    M, rows = logits.shape
    gathered = (torch.ops.llama3.all_gather.default(logits, shard.size) if torch.compiler.is_compiling()
                else _all_gather(logits, shard.size))  # [N * M, rows]
    return gathered.view(shard.size, M, rows).transpose(0, 1).reshape(M, shard.size * rows)[:, :vocab]
