"""Tensor parallelism in the model: two gloo ranks' logits equal one process's to float32 rounding (prefill, a
chunked prefill beside decode rows, decodes; GQA with two KV heads and with one, tied and untied heads, a
vocabulary that does not split evenly); packed weights split on their groups exactly; splits a model cannot take
are refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from model.checkpoint.gguf_blocks import decode
from model.config import ModelConfig
from model.parallel import Shard, check_split, local_config, shard_packed, vocab_rows
from model.quant import PackedWeight, quantize_int4
from tests.model.checkpoint.test_gguf import random_kquant
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["gqa2-tied", "gqa1-untied"])
def test_two_ranks_give_one_process_logits(name, tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "tests/model/tp_ranks.py"), name, str(out)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for rank in ranks:
        _, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-3000:]
    report = json.loads(out.read_text())
    assert len(report) == 6 and all(step["shape_equal"] for step in report)
    assert max(step["max_diff"] for step in report) < 1e-5, report
    assert all(step["argmax_equal"] for step in report), report


def config(heads: int = 9, kv_heads: int = 3, intermediate: int = 1536, vocab: int = 49152) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=576, num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, head_dim=64)


def test_splits_a_model_cannot_take_are_refused():
    with pytest.raises(ValueError, match="does not divide the model's 9 attention heads"):
        check_split(config(), 2)
    with pytest.raises(ValueError, match="neither divides nor is a multiple of the model's 3 key/value heads"):
        check_split(config(heads=12, kv_heads=3), 2)
    with pytest.raises(ValueError, match="intermediate size 1002"):
        check_split(config(heads=8, kv_heads=2, intermediate=1002), 4)
    check_split(config(), 3)
    assert local_config(config(heads=8, kv_heads=2), Shard(1, 4)).num_key_value_heads == 1  # replicated


def test_vocabulary_rows_cover_every_id_once_in_tiles():
    for vocab, size in [(49152, 2), (128256, 8), (1003, 2), (1000, 3)]:
        spans = [vocab_rows(vocab, Shard(r, size)) for r in range(size)]
        assert all(rows % 16 == 0 and rows >= end - first for first, end, rows in spans)
        assert [i for first, end, _ in spans for i in range(first, end)] == list(range(vocab))


@pytest.mark.parametrize("kind", ["q4_1", "q4_k", "q6_k"])
def test_packed_weights_split_exactly_on_their_groups(kind):
    """Every rank's part of a packed weight dequantises to the same slice of the whole weight (the gguf package's
    dequantiser gives the whole one for the K-quants: tests/model/checkpoint/test_gguf.py)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "q4_1":
        weight = quantize_int4(torch.randn(64, 1024, generator=gen))
    else:
        qtype = getattr(Q, kind.upper())
        weight = decode(random_kquant(np.random.default_rng(0), 64, 1024, qtype), qtype)
    whole = weight.dequantize()
    cfg = ModelConfig(vocab_size=64, hidden_size=1024, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=1024, head_dim=256)
    for r in range(4):
        shard = Shard(r, 4)
        down = shard_packed("model.layers.0.mlp.down_proj.weight", weight, cfg, shard)  # columns
        assert torch.equal(down.dequantize(), whole[:, r * 256:(r + 1) * 256])
        narrow = ModelConfig(vocab_size=64, hidden_size=1024, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=64, head_dim=256)
        gate = shard_packed("model.layers.0.mlp.gate_proj.weight", weight, narrow, shard)  # rows
        assert torch.equal(gate.dequantize(), whole[r * 16:(r + 1) * 16])
    if kind != "q4_1":
        with pytest.raises(ValueError, match="only be split every 256 inputs"):
            weight.column_range(0, 128)


def test_the_vocabulary_table_is_padded_with_zero_rows():
    weight = quantize_int4(torch.randn(40, 64))
    cfg = ModelConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64)
    parts = [shard_packed("lm_head.weight", weight, cfg, Shard(r, 2)) for r in range(2)]
    assert all(isinstance(p, PackedWeight) and p.codes.shape[0] == 32 for p in parts)
    joined = torch.cat([p.dequantize() for p in parts])
    assert torch.equal(joined[:40], weight.dequantize()) and not joined[40:].any()
