"""Our Llama against `transformers.LlamaForCausalLM` with identical random weights, in float32."""

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig, RopeScaling
from model.kernels.triton_decode import available as triton_available
from model.kv_cache import KVCache
from model.loading import build_model
from tests.helpers import set_attention_impl

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def tiny_config(tied: bool) -> ModelConfig:
    # original_max_position_embeddings is small so that positions used here cross every Llama 3 band.
    return ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=2, intermediate_size=160, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10_000.0, max_position_embeddings=512, tie_word_embeddings=tied,
                       rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=64))


def make_pair(tied: bool, seed: int = 0):
    config = tiny_config(tied)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.08)
    hf.eval()
    ours = build_model(config, hf.state_dict().items(), dtype=torch.float32)
    return config, hf, ours


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request):
    return make_pair(request.param)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [T, vocab]


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_round_trip_through_transformers(pair):
    config, hf, _ = pair
    assert ModelConfig.from_hf_config(hf.config.to_dict()) == config


def test_full_forward_matches_transformers_at_every_position(pair):
    config, hf, ours = pair
    ids = random_ids(150, seed=1)
    cache = KVCache(config, num_blocks=2, block_size=256)
    logits = ours(ForwardBatch.build([SequenceChunk(1, 0, ids, all_logits=True)]), cache)
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_prefill_then_decode_equals_full_forward(pair):
    config, hf, ours = pair
    ids = random_ids(90, seed=2)
    expected = hf_logits(hf, ids)
    cache = KVCache(config, num_blocks=3, block_size=128)
    prefill = 70
    got = [ours(ForwardBatch.build([SequenceChunk(2, 0, ids[:prefill])]), cache)[0]]
    for pos in range(prefill, len(ids)):
        got.append(ours(ForwardBatch.build([SequenceChunk(2, pos, [ids[pos]])]), cache)[0])
    torch.testing.assert_close(torch.stack(got), expected[prefill - 1:], atol=ATOL, rtol=0)


def test_chunked_prefill_equals_full_forward(pair):
    config, hf, ours = pair
    ids = random_ids(100, seed=3)
    expected = hf_logits(hf, ids)
    cache = KVCache(config, num_blocks=1, block_size=128)
    rows = []
    for start, end in [(0, 37), (37, 38), (38, 100)]:
        chunk = SequenceChunk(0, start, ids[start:end], all_logits=True)
        rows.append(ours(ForwardBatch.build([chunk]), cache))
    torch.testing.assert_close(torch.cat(rows), expected, atol=ATOL, rtol=0)


def test_mixed_batch_equals_each_sequence_alone(pair):
    """Decodes at different positions, a fresh prefill and a continued prefill share one forward call."""
    config, hf, ours = pair
    seqs = [random_ids(n, seed=10 + n) for n in (5, 33, 61, 48, 20)]
    cache = KVCache(config, num_blocks=6, block_size=128)
    slots = [4, 0, 5, 2, 1]
    # Earlier steps: sequences 0-2 have all but their last token cached; 4 has its first 7 tokens cached.
    for seq, slot in zip(seqs[:3], slots[:3]):
        ours(ForwardBatch.build([SequenceChunk(slot, 0, seq[:-1])]), cache)
    ours(ForwardBatch.build([SequenceChunk(slots[4], 0, seqs[4][:7])]), cache)

    chunks = [SequenceChunk(slot, len(seq) - 1, seq[-1:]) for seq, slot in zip(seqs[:3], slots[:3])]
    chunks.append(SequenceChunk(slots[3], 0, seqs[3], all_logits=True))
    chunks.append(SequenceChunk(slots[4], 7, seqs[4][7:]))
    logits = ours(ForwardBatch.build(chunks), cache)

    expected = [hf_logits(hf, s)[-1:] for s in seqs[:3]]
    expected += [hf_logits(hf, seqs[3]), hf_logits(hf, seqs[4])[-1:]]
    torch.testing.assert_close(logits, torch.cat(expected), atol=ATOL, rtol=0)


def test_sdpa_and_triton_equal_reference_attention(pair):
    """The CPU kernels and the CUDA decode kernel (in Triton's interpreter when there is no GPU) against the
    reference path, through the whole model."""
    config, _, ours = pair
    seqs = [random_ids(n, seed=20 + n) for n in (9, 40, 17)]
    impls = ("reference", "sdpa", "triton") if triton_available("cpu") else ("reference", "sdpa")
    results = {}
    for impl in impls:
        set_attention_impl(ours, impl)
        cache = KVCache(config, num_blocks=3, block_size=64)
        ours(ForwardBatch.build([SequenceChunk(i, 0, s[:-1]) for i, s in enumerate(seqs)]), cache)
        first = ours(ForwardBatch.build([SequenceChunk(i, 0, s[:-1], all_logits=True) for i, s in enumerate(seqs)]),
                     KVCache(config, num_blocks=3, block_size=64))
        decode = ours(ForwardBatch.build([SequenceChunk(i, len(s) - 1, s[-1:]) for i, s in enumerate(seqs)]), cache)
        results[impl] = (first, decode)
    set_attention_impl(ours, "sdpa")
    for impl in impls[1:]:
        for ref, got in zip(results["reference"], results[impl]):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_bf16_stays_close_to_float32():
    config, hf, _ = make_pair(tied=True, seed=5)
    ours = build_model(config, hf.state_dict().items(), dtype=torch.bfloat16)
    ids = random_ids(40, seed=6)
    logits = ours(ForwardBatch.build([SequenceChunk(0, 0, ids, all_logits=True)]),
                  KVCache(config, 1, 64, dtype=torch.bfloat16))
    expected = hf_logits(hf, ids)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


def test_positions_beyond_the_block_table_or_the_model_are_refused(pair):
    config, _, ours = pair
    with pytest.raises(ValueError, match="cannot hold"):  # 17 tokens, one block of 16
        ForwardBatch.build([SequenceChunk(0, 10, list(range(7)), blocks=(0,))], block_size=16)
    cache = KVCache(config, num_blocks=40, block_size=16)
    end = ours.max_seq_len + 1
    with pytest.raises(ValueError, match="beyond"):
        ours(ForwardBatch.build([SequenceChunk(0, end - 3, [1, 2, 3], blocks=tuple(range(40)))], block_size=16),
             cache)


def test_build_model_names_the_broken_tensor(pair):
    config, hf, _ = pair
    state = dict(hf.state_dict())
    wrong = dict(state)
    wrong["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*shape \(3, 3\)"):
        build_model(config, wrong.items())
    missing = {k: v for k, v in state.items() if k != "model.layers.2.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model.layers.2.self_attn.k_proj.weight"):
        build_model(config, missing.items())
    extra = dict(state, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})
    with pytest.raises(ValueError, match="q_proj.bias.*not part of a Llama model"):
        build_model(config, extra.items())
