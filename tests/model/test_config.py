"""Model presets and config parsing, checked against the architectures Meta publishes and against transformers."""

import pytest
import torch

from model.config import ModelConfig, RopeScaling, preset_names

transformers = pytest.importorskip("transformers")

# vocab, hidden, layers, heads, kv heads, ffn, tied, rope factor — as Meta publishes them
PUBLISHED = {
    "llama-3.2-1b": (128_256, 2048, 16, 32, 8, 8192, True, 32.0),
    "llama-3.2-3b": (128_256, 3072, 28, 24, 8, 8192, True, 32.0),
    "llama-3.1-8b": (128_256, 4096, 32, 32, 8, 14_336, False, 8.0),
    "llama-3.1-70b": (128_256, 8192, 80, 64, 8, 28_672, False, 8.0),
}


def test_every_preset_is_known():
    assert preset_names() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_the_published_architecture(name):
    c = ModelConfig.from_preset(name)
    vocab, hidden, layers, heads, kv_heads, ffn, tied, factor = PUBLISHED[name]
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.tie_word_embeddings) == (vocab, hidden, layers, heads, kv_heads, ffn, tied)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (500_000.0, 1e-5, 131_072)
    assert c.rope_scaling == RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_transformers(name):
    c = ModelConfig.from_preset(name)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c.to_hf_config()))
    assert c.num_params == sum(p.numel() for p in hf.parameters())


def test_config_json_as_transformers_reads_it(tmp_path):
    hf = transformers.LlamaConfig(vocab_size=1000, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                                  num_key_value_heads=2, intermediate_size=200, head_dim=32, rope_theta=123.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 2.0, "original_max_position_embeddings": 64},
                                  tie_word_embeddings=True, max_position_embeddings=512)
    hf.save_pretrained(tmp_path)
    c = ModelConfig.from_json_file(tmp_path / "config.json")
    assert (c.head_dim, c.rope_theta, c.num_key_value_heads, c.tie_word_embeddings) == (32, 123.0, 2, True)
    assert c.rope_scaling == RopeScaling(4.0, 1.0, 2.0, 64)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size must be positive"),
])
def test_bad_configs_are_refused_clearly(change, message):
    base = ModelConfig.from_preset("llama-3.2-1b").to_hf_config()
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**base, **change})


def test_missing_field_is_named():
    base = ModelConfig.from_preset("llama-3.2-1b").to_hf_config()
    del base["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf_config(base)
