"""One rank of a tensor-parallel check (tests/model/test_parallel.py starts every rank with torchrun's variables).

Every rank builds the same random Llama 3 checkpoint and keeps its shard; the ranks run a prefill, a chunked
prefill beside a decode row, and decode steps over their KV caches. Rank 0 also runs the whole model on one
process and writes, for each step, the largest difference between the logits and whether the argmax agrees.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.llama import Llama
from model.loading import build_model
from model.parallel import Shard

CONFIGS = {
    "gqa2-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1000),
    "gqa1-untied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, vocab_size=1003),
}


def checkpoint(config: ModelConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {name: torch.randn(shape, generator=gen) * 0.2 for name, shape in shapes.items()}
    state.update({name: 1 + 0.1 * torch.randn(shape, generator=gen) for name, shape in shapes.items()
                  if "norm" in name})
    return state


def steps() -> list[list[SequenceChunk]]:
    """Sequence 0: a 10-token prompt then decodes; sequence 1: a 12-token prompt in chunks of 7 and 5 beside
    sequence 0's decodes, then decodes. Blocks of 4 tokens: sequence 0 owns blocks 0-5, sequence 1 blocks 6-11."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 1000, (10,), generator=gen).tolist(), torch.randint(0, 1000, (12,), generator=gen).tolist()
    ta, tb = tuple(range(0, 6)), tuple(range(6, 12))
    out = [[SequenceChunk(0, 0, a, blocks=ta), SequenceChunk(1, 0, b[:7], blocks=tb)],
           [SequenceChunk(0, 10, [5], decode=True, blocks=ta), SequenceChunk(1, 7, b[7:], blocks=tb)]]
    for i in range(4):
        out.append([SequenceChunk(0, 11 + i, [17 + i], decode=True, blocks=ta),
                    SequenceChunk(1, 12 + i, [300 + i], decode=True, blocks=tb)])
    return out


def main() -> None:
    name, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, max_position_embeddings=256,
                         **CONFIGS[name])
    state = checkpoint(config)
    shard = build_model(config, state.items(), dtype=torch.float32, shard=Shard(rank, world))
    cache = KVCache(shard.layer_config, 12, 4)
    whole = build_model(config, state.items(), dtype=torch.float32) if rank == 0 else None
    whole_cache = KVCache(config, 12, 4) if rank == 0 else None
    report = []
    for chunks in steps():
        logits = shard(ForwardBatch.build(chunks, "cpu", 4), cache)
        if rank == 0:
            expected = whole(ForwardBatch.build(chunks, "cpu", 4), whole_cache)
            report.append({"rows": logits.shape[0], "max_diff": (logits - expected).abs().max().item(),
                           "argmax_equal": torch.equal(logits.argmax(-1), expected.argmax(-1)),
                           "shape_equal": logits.shape == expected.shape})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
