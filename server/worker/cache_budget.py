"""How many blocks the KV cache gets, from the flags and, on CUDA, from the memory measured after loading."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.parallel import Shard
from server.engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_KV_CACHE_MEMORY, EngineConfig

log = logging.getLogger(__name__)


def cuda_kv_cache_budget(config: EngineConfig, model, max_model_len: int, dtype: torch.dtype,
                         utilization: float) -> int:
    """Bytes for the KV cache on CUDA, as vLLM's --gpu-memory-utilization: that fraction of the device, less what
    is in use once the weights are loaded and a warm-up pass of the largest batch has run, less that pass's peak
    activations and the per-sequence buffers the decode step and the sampler allocate after the cache."""
    device = torch.device(config.device)
    tokens = min(config.max_num_batched_tokens, max_model_len)  # the largest forward pass a step runs
    blocks = -(-tokens // config.block_size)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    cache = KVCache(model.layer_config, blocks, config.block_size, dtype=dtype, device=device)
    warmup = SequenceChunk(0, 0, [0] * tokens, blocks=tuple(range(blocks)))
    model(ForwardBatch.build([warmup], device, config.block_size), cache)
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before - cache.nbytes
    del cache
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # Decode logits (float32) and the sampler's copy of them, output counts (int32) and prompt masks (bool).
    per_sequence = model.config.vocab_size * (4 + 4 + 4 + 1)
    budget = int(utilization * total) - (total - free) - activations - config.max_num_seqs * per_sequence
    log.info("CUDA memory: %.1f of %.1f GiB in use after loading and a warm-up pass of %d tokens (peak activations "
             "%.2f GiB); --gpu-memory-utilization %.2f leaves %.2f GiB for the KV cache", (total - free) / 2**30,
             total / 2**30, tokens, activations / 2**30, utilization, budget / 2**30)
    return budget


def kv_cache_blocks(config: EngineConfig, model, max_model_len: int, dtype: torch.dtype, draft=None) -> int:
    """Blocks the KV cache gets: --kv-cache-memory bytes; on CUDA, --gpu-memory-utilization (0.9 by default, as
    vLLM) measured by cuda_kv_cache_budget; else room for every sequence at full length, at most
    DEFAULT_KV_CACHE_MEMORY. A draft model's cache has as many blocks (the same block tables index both), so a
    block costs both models' bytes."""
    per_token = sum(KVCache.bytes_per_token(m.layer_config, m.dtype) for m in (model, draft) if m is not None)
    per_block = per_token * config.block_size
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    elif torch.device(config.device).type == "cuda":
        utilization = config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        budget = cuda_kv_cache_budget(config, model, max_model_len, dtype, utilization)
    else:
        wanted = config.max_num_seqs * max_model_len * per_block // config.block_size
        budget = min(wanted, DEFAULT_KV_CACHE_MEMORY)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {config.block_size} tokens "
                         f"({per_block} bytes)")
    return int(blocks)


def cache_layout(config: EngineConfig, model, shard: Shard = Shard(), draft=None) -> tuple[int, int]:
    """(blocks, max_model_len): the KV cache's blocks and the longest sequence it serves (and a draft model's, whose
    cache has the same blocks). A split model's ranks each measure their own budget and take the smallest block
    count (a collective: every rank calls this)."""
    max_model_len = min(config.max_model_len, model.max_seq_len, draft.max_seq_len if draft else model.max_seq_len)
    num_blocks = kv_cache_blocks(config, model, max_model_len, model.dtype, draft)
    if shard.split:
        count = torch.tensor([num_blocks], dtype=torch.long)
        count = count.to(config.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        num_blocks = int(count.item())
    if num_blocks * config.block_size < max_model_len:  # a sequence alone must always fit
        log.warning("the KV cache holds %d tokens, fewer than --max-model-len %d: sequences are limited to %d",
                    num_blocks * config.block_size, max_model_len, num_blocks * config.block_size)
        max_model_len = num_blocks * config.block_size
    return num_blocks, max_model_len
