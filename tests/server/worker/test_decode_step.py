"""What the prepared decode steps share: the decode table and the ladder lookup; compiled steps of two models."""

from __future__ import annotations

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig
from model.kernels.cpu import packed_linear_kernel
from model.kv_cache import KVCache
from model.llama import Llama
from model.loading import build_model
from model.quant import (GROUP_SIZE, K16, K32, LEGACY, SUPER, PackedEmbedding, PackedLinear, PackedWeight,
                         quantize_model)
from server.worker.decode.compiled import CompiledDecode
from server.worker.decode.step import DecodeStep, decode_table

BLOCK = 16


def test_decode_table_pads_with_length_zero():
    rows = decode_table([11, 12], [0, 33], [(5,), (7, 8, 9, 10)], size=4, block_size=BLOCK)
    assert rows.tolist() == [[11, 0, 1, 5, 0, 0],
                             [12, 33, 34, 7, 8, 9],  # position 33 is in the third block: 3 blocks, not 4
                             [0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0, 0]]


def test_size_for_is_the_smallest_prepared_size_that_holds_the_batch():
    step = DecodeStep(model=None, cache=None, max_batch=20, device=None, sizes=[8, 1, 20, 4, 2, 16])
    assert [step.size_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert step.size_for(21) is None


def _tiny_packed_model(layers: int, bits: int, hidden: int = 64) -> Llama:
    """A random two-head model, its linear layers quantised to `bits` (the packed kernel's path)."""
    config = ModelConfig(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=256,
                         tie_word_embeddings=False, name=f"tiny-{layers}-{bits}")
    gen = torch.Generator().manual_seed(bits)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}
    state = {name: torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.2
             for name, shape in shapes.items()}
    model = build_model(config, state.items(), dtype=torch.bfloat16)
    quantize_model(model, None, bits)
    return model


@pytest.mark.skipif(packed_linear_kernel() is None, reason="needs the packed linear kernel")
def test_two_compiled_steps_in_one_process_each_run_their_own_model():
    """With the module guards skipped, a second model compiled in the same process (another test's model, a draft
    model) must get a graph of its own, not the first one's."""
    for layers, bits in ((2, 4), (2, 8)):  # the same shapes, so only the weights' format tells them apart
        model = _tiny_packed_model(layers, bits)
        cache = KVCache(model.config, 4, BLOCK, dtype=torch.bfloat16)
        step = CompiledDecode(model, cache, max_batch=2, device=torch.device("cpu"))
        assert step.prepare(), (layers, bits)
        eager_cache = KVCache(model.config, 4, BLOCK, dtype=torch.bfloat16)
        for position, token in enumerate([3, 17, 42]):
            compiled = step.run([token], [position], [(1,)])
            eager = model(ForwardBatch.build([SequenceChunk(0, position, [token], blocks=(1,), decode=True)],
                                             block_size=BLOCK), eager_cache)
            assert torch.equal(compiled, eager), (layers, bits, position)


@pytest.mark.skipif(packed_linear_kernel() is None, reason="needs the packed linear kernel")
@pytest.mark.parametrize("bits, kind", [(4, LEGACY), (5, K32), (6, K16), (8, LEGACY)])
def test_a_step_over_each_packed_embedding_compiles_and_equals_eager(bits, kind):
    """The step reads the token's embedding from packed codes (PackedLinear.rows), so each format's unpacking is
    compiled with it; a 6-bit table once made Inductor refuse its own output and the step quietly ran eagerly."""
    model = _tiny_packed_model(1, 4, hidden=256)
    N, K = model.config.vocab_size, model.config.hidden_size
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(-128 if bits == 8 else 0, 128 if bits == 8 else 2 ** bits, (N, K), generator=gen)
    units = K // GROUP_SIZE if kind == LEGACY else K // SUPER
    scale = (torch.rand(N, units, generator=gen) * 0.01).half()
    offset = torch.zeros_like(scale) if bits == 8 else (-torch.rand(N, units, generator=gen) * 0.05).half()
    sub = None if kind == LEGACY else torch.randint(0, 64, (N, K // GROUP_SIZE, 2), generator=gen, dtype=torch.uint8)
    weight = PackedWeight(bits, kind, codes.to(torch.int8 if bits == 8 else torch.uint8), scale, offset, sub)
    model.model.embed_tokens = PackedEmbedding(PackedLinear.from_weight(weight), torch.bfloat16)
    cache, eager_cache = (KVCache(model.config, 4, BLOCK, dtype=torch.bfloat16) for _ in range(2))
    step = CompiledDecode(model, cache, max_batch=2, device=torch.device("cpu"))
    assert step.prepare(), (bits, kind)
    for position, token in enumerate([3, 200, 42]):
        compiled = step.run([token], [position], [(1,)])
        eager = model(ForwardBatch.build([SequenceChunk(0, position, [token], blocks=(1,), decode=True)],
                                         block_size=BLOCK), eager_cache)
        assert torch.equal(compiled, eager), (bits, kind, position)
