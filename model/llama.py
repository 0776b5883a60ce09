"""Llama 3: embeddings, pre-norm decoder blocks, final norm, output head (tied or not)."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention
from model.batch import ForwardBatch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.layers import MLP, RMSNorm
from model.parallel import Shard, all_reduce, gather_vocab, local_config, vocab_rows
from model.rope import rope_tables


class DecoderLayer(nn.Module):
    """`config`: this rank's shapes (model.parallel.local_config); `shard.split`: the attention's and the
    feed-forward's outputs are partial sums, added over the ranks."""

    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, shard)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, shard)

    def forward(self, x, cos, sin, batch: ForwardBatch, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_rows(config.vocab_size, shard)[2], config.hidden_size)
        layer_config = local_config(config, shard)
        self.layers = nn.ModuleList(DecoderLayer(layer_config, shard) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """Module names equal the Hugging Face checkpoint's tensor names, so loading is an identity map.

    `shard`: this model is rank `shard.rank` of a tensor-parallel group of `shard.size` (model/parallel.py); its
    forward then takes part in the group's collectives, and every rank returns the whole vocabulary's logits.
    `config` is the whole model's; `layer_config` this rank's layer shapes (the KV cache's)."""

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None, shard: Shard = Shard()):
        super().__init__()
        self.config = config
        self.shard = shard
        self.layer_config = local_config(config, shard)
        self.max_seq_len = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
        self.model = LlamaModel(config, shard)
        self.lm_head = nn.Linear(config.hidden_size, vocab_rows(config.vocab_size, shard)[2], bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables; needed after building the model on the meta device."""
        cos, sin = rope_tables(self.config, self.max_seq_len, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (and the KV cache's), whatever the linear layers store: the norms' own."""
        return self.model.norm.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] in float32, only for the rows that need them."""
        return self.run(batch, cache)

    def run(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """`forward` without entering inference mode: what a compiled step traces, under `torch.no_grad`
        (inference tensors cannot be mutated through views inside a compiled graph)."""
        # A prepared decode step's batch (max_position None) was checked by its caller: the check would read a host
        # int that changes every step.
        if batch.max_position is not None and batch.max_position >= self.max_seq_len:
            raise ValueError(f"position {batch.max_position} is beyond the model's maximum length")
        x = self._embed(batch.input_ids)  # [N, dim]
        cos = self.rope_cos[batch.positions]  # [N, D/2]
        sin = self.rope_sin[batch.positions]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, cache.k[i], cache.v[i])
        if batch.prefills:  # decode-only batches want every row, in order
            x = x[batch.logits_indices]  # [M, dim]
        logits = self.lm_head(self.model.norm(x)).float()
        return gather_vocab(logits, self.config.vocab_size, self.shard) if self.shard.split else logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.shard.split:
            return self.model.embed_tokens(ids)
        first, end, _ = vocab_rows(self.config.vocab_size, self.shard)
        mine = (ids >= first) & (ids < end)  # each id is one rank's: the others add zeros
        x = self.model.embed_tokens(torch.where(mine, ids - first, 0))
        return all_reduce(x * mine[:, None].to(x.dtype))
