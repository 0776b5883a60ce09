"""The model on CUDA in bf16 against the CPU float32 reference (skipped without a GPU)."""

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCache
from model.llama import Llama
from model.loading import build_model

pytestmark = pytest.mark.gpu


def all_logits(model, ids: list[int], device: str, dtype: torch.dtype) -> torch.Tensor:
    cache = KVCache(model.config, 1, len(ids) + 1, dtype=dtype, device=device)
    return model(ForwardBatch.build([SequenceChunk(0, 0, ids, all_logits=True)], device), cache).cpu()


def compare_with_cpu_float32(device: str) -> None:
    """Teacher-forced: the bf16 model's argmax equals float32's wherever float32 is not near a tie."""
    config = ModelConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256,
                         rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {name: (torch.ones(s) if "norm" in name else torch.randn(s, generator=gen) * 0.1)
             for name, s in shapes.items()}
    ids = torch.randint(0, config.vocab_size, (40,), generator=gen).tolist()
    reference = all_logits(build_model(config, state.items(), dtype=torch.float32), ids, "cpu", torch.float32)
    model = build_model(config, state.items(), device=device, dtype=torch.bfloat16)
    got = all_logits(model, ids, device, torch.bfloat16)
    top2 = reference.topk(2, dim=-1).values
    error = (got.float() - reference).abs().amax(dim=-1)  # bf16's error in each position's logits
    clear = (top2[:, 0] - top2[:, 1]) > 2 * error         # positions where that error cannot flip the argmax
    assert clear.sum() >= 30 and error.max() < 0.05 * reference.abs().max()
    assert torch.equal(got.argmax(-1)[clear], reference.argmax(-1)[clear])


def test_cuda_bf16_matches_cpu_float32():
    compare_with_cpu_float32("cuda")
