"""Packed linear layers (model/quant.py and its CPU kernel) for every type served as stored, checked against gguf's
own dequantisation, float64 matmuls on the dequantised weights, and the float model."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

import model.quant as quant
from model.batch import ForwardBatch, SequenceChunk
from model.checkpoint.gguf import config_from_gguf, gguf_packed_weights, load_gguf_state_dict
from model.checkpoint.gguf_blocks import PACKED_TYPES, decode
from model.checkpoint.gguf_file import GGUFFile
from model.kernels.cpu import packed_linear_kernel
from model.kv_cache import KVCache
from model.loading import build_model, load
from model.paths import default_gguf_path
from model.quant import GROUP_SIZE, PackedEmbedding, PackedLinear, quantize_int4, quantize_int8
from tests.model.checkpoint.test_gguf import K_QUANTS, random_kquant

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TYPES = sorted(PACKED_TYPES, key=lambda t: t.name)

needs_kernel = pytest.mark.skipif(packed_linear_kernel() is None,
                                  reason="the packed linear kernel needs a C compiler and AVX-512 BF16")


def bf16_inputs(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def gguf_file():
    return GGUFFile(default_gguf_path())


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def packed_tensor(request):
    """(raw bytes, type, gguf's float32 dequantisation) of a random [48, 512] tensor of each packed type: quantised
    by gguf from random weights (with an all-zero row, whose blocks have d = 0), or random K-quant blocks."""
    qtype, rng = request.param, np.random.default_rng(0)
    if qtype in K_QUANTS:
        raw = random_kquant(rng, 48, 512, qtype)
    else:
        weights = rng.standard_normal((48, 512), dtype=np.float32) * 0.05
        weights[7] = 0
        raw = gguf.quants.quantize(weights, qtype)
    return raw, qtype, torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())


def test_decoded_blocks_reproduce_gguf_dequantize_exactly(packed_tensor):
    raw, qtype, reference = packed_tensor
    weight = decode(raw, qtype)
    assert weight.codes.shape == reference.shape
    if weight.bits < 8:
        assert int(weight.codes.min()) >= 0 and int(weight.codes.max()) < 2 ** weight.bits
    assert torch.equal(weight.dequantize(), reference)


def test_packing_keeps_every_weight_exactly(packed_tensor):
    raw, qtype, reference = packed_tensor
    layer = PackedLinear.from_weight(decode(raw, qtype))
    assert (layer.out_features, layer.in_features) == reference.shape
    assert torch.equal(layer.dequantize(), reference)
    rows = torch.tensor([0, 7, 31, 47, 7])
    assert torch.equal(layer.rows(rows), reference[rows])  # an embedding's lookup, from the tiles


def test_decoding_and_packing_by_chunks_of_rows_give_the_same_buffers(packed_tensor):
    """Large tensors are decoded and packed a few thousand rows at a time (to bound load's temporaries); chunks
    of 16 rows here, against the tensor at once."""
    raw, qtype, reference = packed_tensor
    whole, chunked = decode(raw, qtype), decode(raw, qtype, chunk=16)
    for name in ("codes", "d", "m", "sub"):
        assert (getattr(whole, name) is None) == (getattr(chunked, name) is None), name
        if getattr(whole, name) is not None:
            assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    layer, by_tiles = PackedLinear.from_weight(whole), PackedLinear.from_weight(chunked, chunk=16)
    for name in ("codes", "high", "scales", "sub"):
        assert torch.equal(getattr(layer, name), getattr(by_tiles, name)), name
    assert torch.equal(by_tiles.dequantize(), reference)


def test_resident_bytes_are_near_the_file_bytes(packed_tensor):
    raw, qtype, _ = packed_tensor
    assert PackedLinear.from_weight(decode(raw, qtype)).nbytes <= 1.15 * raw.nbytes


@needs_kernel
@pytest.mark.parametrize("out_float", [False, True])
def test_packed_linear_matches_a_float64_matmul_on_the_stored_weight(packed_tensor, out_float):
    """The kernel multiplies by the exact weights in float32: float32 summation and, for bfloat16 outputs, the
    output's rounding remain."""
    raw, qtype, reference = packed_tensor
    layer = PackedLinear.from_weight(decode(raw, qtype), out_float=out_float)
    for rows in (1, 17):
        x = bf16_inputs(rows, reference.shape[1], seed=rows)
        y = layer(x)
        assert y.shape == (rows, reference.shape[0])
        assert y.dtype == (torch.float32 if out_float else torch.bfloat16)
        expected = x.double() @ reference.double().T
        bound = 1e-6 * (x.double().abs() @ reference.double().abs().T)  # float32 summation of these terms
        if not out_float:
            bound = bound + 2 ** -8 * expected.abs()                      # half a bfloat16 step
        assert ((y.double() - expected).abs() <= bound).all(), rows


@needs_kernel
def test_each_row_is_bitwise_the_same_alone_or_in_a_batch(packed_tensor):
    raw, qtype, reference = packed_tensor
    layer = PackedLinear.from_weight(decode(raw, qtype), out_float=True)
    x = bf16_inputs(19, reference.shape[1])  # blocks of rows of every size, a partial one, and tiles unpacked once
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(batched[i], layer(x[i:i + 1])[0]), i
    assert torch.equal(batched[5:12], layer(x[5:12]))


def test_quantize_int4_and_int8_errors_are_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    spread = torch.logspace(-3, 1, 64)[:, None]
    weight = torch.randn(64, 256, generator=gen) * spread + torch.randn(64, 1, generator=gen)
    weight[3, 32:64] = 0.25
    weight[5] = 0
    w4 = quantize_int4(weight)
    assert w4.codes.shape == weight.shape and w4.d.dtype == torch.float16
    step = w4.d.float().repeat_interleave(GROUP_SIZE, dim=1)
    slack = 1e-3 * (weight.abs() + step)  # the float16 offset's rounding
    assert ((w4.dequantize() - weight).abs() <= step / 2 + slack).all()
    assert torch.equal(PackedLinear.from_weight(w4).dequantize(), w4.dequantize())

    w8 = quantize_int8(weight)
    assert int(w8.codes.abs().max()) == 127 and not w8.codes[5].any()
    step = w8.d.float().repeat_interleave(GROUP_SIZE, dim=1)
    assert ((w8.dequantize() - weight).abs() <= step / 2 + 1e-6 * weight.abs()).all()
    assert torch.equal(PackedLinear.from_weight(w8).dequantize(), w8.dequantize())
    for quantize in (quantize_int4, quantize_int8):
        with pytest.raises(ValueError, match="divisible by 32"):
            quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="divisible by 16"):
        PackedLinear.from_weight(quantize_int8(torch.zeros(24, 64)))


@needs_kernel
def test_fused_layers_give_exactly_the_separate_layers_outputs(gguf_file):
    weights = dict(gguf_packed_weights(default_gguf_path()))
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    layers = [PackedLinear.from_weight(weights[n]) for n in names]
    x = bf16_inputs(9, 576)
    separate = [layer(x) for layer in layers]
    fused = quant.fuse(layers)
    assert fused.out_features == sum(layer.out_features for layer in layers)
    assert torch.equal(fused(x), torch.cat(separate, dim=1))
    for layer, alone in zip(layers, separate):  # the given layers now read views of the fused buffers
        assert torch.equal(layer(x), alone)
    assert layers[1].codes.data_ptr() == fused.codes[layers[0].codes.shape[0]:].data_ptr()
    assert quant.fuse([layers[0], PackedLinear.from_weight(quantize_int8(torch.randn(32, 576)))]) is None


def test_gguf_packed_weights_are_the_unpermuted_dequantized_weights(gguf_file):
    path = default_gguf_path()
    weights = dict(gguf_packed_weights(path))
    layers = gguf_file.metadata["llama.block_count"]
    assert set(weights) == {f"model.layers.{i}.{p}.weight" for i in range(layers) for p in PROJECTIONS} | {
        "model.embed_tokens.weight"}  # the Q8_0 embedding, which the tied output head shares
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        hf_name = f"model.layers.0.{name}.weight"
        assert torch.equal(weights[hf_name].dequantize(), state[hf_name]), name
    assert torch.equal(weights["model.embed_tokens.weight"].dequantize(), state["model.embed_tokens.weight"])
    as_stored = decode(gguf_file.tensor_bytes(gguf_file.tensors["blk.0.attn_q.weight"]), Q.Q4_1)
    assert not torch.equal(as_stored.dequantize(), state["model.layers.0.self_attn.q_proj.weight"])


def test_a_mixed_file_packs_its_packed_types_and_leaves_the_rest_dense(tmp_path):
    types = {"token_embd": Q.Q4_K, "attn_q": Q.Q5_0, "attn_k": Q.Q4_1, "attn_v": Q.Q6_K, "attn_output": Q.F16,
             "ffn_gate": Q.Q5_K, "ffn_up": Q.Q3_K, "ffn_down": Q.Q8_0, "output": Q.IQ4_NL}
    shapes = {"token_embd": (96, 256), "attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256),
              "attn_output": (256, 256), "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512),
              "output": (96, 256)}
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "context_length": 128, "embedding_length": 256, "feed_forward_length": 512,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 96}.items():
        writer.add_uint32(f"llama.{key}", value)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        qtype = types[name]
        if qtype in K_QUANTS:
            data = random_kquant(rng, *shape, qtype)
        elif qtype in (Q.Q3_K, Q.IQ4_NL):  # quantised by hand where gguf has no quantiser: any bytes are a tensor
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
            scale = np.array([1e-3], np.float16).view(np.uint8)
            data[..., :2] = data[..., -2:] = scale  # a small finite d (IQ4_NL's first field, Q3_K's last)
            data = data.reshape(shape[0], -1)
        else:
            data = gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32), qtype)
        writer.add_tensor(f"{'' if name in ('token_embd', 'output') else 'blk.0.'}{name}.weight", data,
                          raw_dtype=qtype)
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = config_from_gguf(path)
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    weights = dict(gguf_packed_weights(path))
    packed = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert sorted(weights) == sorted([f"model.layers.0.{p}.weight" for p in packed] + ["model.embed_tokens.weight"])
    for name, weight in weights.items():
        assert torch.equal(weight.dequantize(), state[name]), name

    dense = {k: v for k, v in state.items() if k not in weights}
    model = build_model(config, dense.items(), dtype=torch.bfloat16, packed=weights.items())
    block = model.model.layers[0]
    assert isinstance(model.model.embed_tokens, PackedEmbedding)  # Q4_K: looked up by row
    assert [type(m) for m in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.up_proj, model.lm_head)] == \
        [PackedLinear, nn.Linear, nn.Linear, nn.Linear]  # Q5_0; F16, Q3_K and IQ4_NL dequantised
    ids = torch.tensor([3, 95, 17])
    assert torch.equal(model.model.embed_tokens(ids), state["model.embed_tokens.weight"][ids].to(torch.bfloat16))


@pytest.mark.parametrize("kwargs, match", [(dict(quantization="int4", device="cuda"), "CPU"),
                                           (dict(quantization="int8", device="meta"), "CPU"),
                                           (dict(quantization="int3"), "unknown quantization")])
def test_load_refuses_packed_weights_off_cpu_and_unknown_quantizations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load(None, **kwargs)


@pytest.fixture
def one_thread():
    """When the other core of a 2-core machine is busy, torch's two OpenMP threads wait on each other (this test
    took 80 s instead of 4 s); the results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@needs_kernel
def test_packed_model_from_gguf_knows_the_capital_of_france(one_thread):
    loaded = load(None, dtype=torch.bfloat16, quantization="auto")
    model = loaded.model
    layers = loaded.config.num_hidden_layers
    linears = [m for m in model.model.layers.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert len(linears) == (len(PROJECTIONS) + 2) * layers  # and q/k/v, gate/up fused
    assert all(isinstance(m, PackedLinear) and m.bits == 4 for m in linears)
    assert model.lm_head is model.model.embed_tokens.table and model.lm_head.bits == 8  # the tied Q8_0 embedding
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())  # no dense table is kept

    ids = loaded.tokenizer.encode_prompt("The capital of France is")
    cache = KVCache(loaded.config, num_blocks=1, block_size=len(ids) + 16, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(ForwardBatch.build([SequenceChunk(0, 0, ids)]), cache)
        out = [int(logits[0].argmax())]
        while len(out) < 16:
            chunk = SequenceChunk(0, len(ids) + len(out) - 1, out[-1:], decode=True)
            out.append(int(model(ForwardBatch.build([chunk]), cache)[0].argmax()))
    text = loaded.tokenizer.decode(out)
    assert "Paris" in text, text
