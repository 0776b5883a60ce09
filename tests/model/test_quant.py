"""Packed 4- and 8-bit linear layers (model/quant.py and its CPU kernel), checked against gguf's own
dequantisation, float32 matmuls on the dequantised weights, and the float model."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

import model.quant as quant
from model.batch import ForwardBatch, SequenceChunk
from model.checkpoint.gguf import config_from_gguf, gguf_packed_weights, load_gguf_state_dict
from model.checkpoint.gguf_blocks import gguf_q4_codes, gguf_q8_codes
from model.checkpoint.gguf_file import GGUFFile
from model.kernels.cpu import packed_linear_kernel
from model.kv_cache import KVCache
from model.loading import _quantize, build_model, load
from model.paths import default_gguf_path
from model.quant import GROUP_SIZE, Int4Linear, Int8Linear, PackedLinear, quantize_int4, quantize_int8

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

needs_kernel = pytest.mark.skipif(packed_linear_kernel(4) is None,
                                  reason="the packed linear kernel needs a C compiler and AVX-512 BF16")


def grouped(codes, scales, offsets=None):
    """codes * scale (+ offset), one scale (and offset) per group of 32 input features, in float32."""
    N, K = codes.shape
    w = codes.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE) * scales.float()[..., None]
    if offsets is not None:
        w = w + offsets.float()[..., None]
    return w.reshape(N, K)


def bf16_inputs(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def gguf_file():
    return GGUFFile(default_gguf_path())


@pytest.fixture(scope="module", params=["Q4_1", "Q4_0", "Q8_0"])
def packed_tensor(request, gguf_file):
    """(raw bytes, kind, gguf's float32 dequantisation): real Q4_1 and Q8_0 tensors of the default GGUF (an FFN
    projection and the tied embedding), or a Q4_0 one quantised by gguf from random weights (with one all-zero
    row, whose blocks have d = 0)."""
    if request.param == "Q4_0":
        weights = np.random.default_rng(0).standard_normal((128, 576), dtype=np.float32) * 0.05
        weights[7] = 0
        raw, qtype = gguf.quants.quantize(weights, Q.Q4_0), Q.Q4_0
    else:
        info = gguf_file.tensors["blk.0.ffn_gate.weight" if request.param == "Q4_1" else "token_embd.weight"]
        assert info.qtype == Q[request.param]
        raw, qtype = gguf_file.tensor_bytes(info), info.qtype
    return raw, request.param, torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())


def codes_of(raw, kind):
    return gguf_q8_codes(raw) if kind == "Q8_0" else gguf_q4_codes(raw, kind)


def layer_of(raw, kind, **kwargs) -> PackedLinear:
    return (Int8Linear if kind == "Q8_0" else Int4Linear).from_codes(*codes_of(raw, kind), **kwargs)


def test_gguf_codes_reproduce_gguf_dequantize_exactly(packed_tensor):
    raw, kind, reference = packed_tensor
    parts = codes_of(raw, kind)
    codes, scales = parts[:2]
    N, K = reference.shape
    assert codes.shape == (N, K) and all(p.shape == (N, K // GROUP_SIZE) for p in parts[1:])
    low, high = (-127, 127) if kind == "Q8_0" else (0, 15)
    assert int(codes.min()) >= low and int(codes.max()) <= high
    if kind == "Q4_0":
        assert torch.equal(parts[2], -8 * scales)
    assert torch.equal(grouped(*parts), reference)


def test_packing_keeps_every_weight_exactly(packed_tensor):
    raw, kind, reference = packed_tensor
    layer = layer_of(raw, kind)
    assert (layer.out_features, layer.in_features) == reference.shape
    assert torch.equal(layer.dequantize(), reference)


@needs_kernel
@pytest.mark.parametrize("out_float", [False, True])
def test_packed_linear_matches_a_float32_matmul_on_the_stored_weight(packed_tensor, out_float):
    """The kernel multiplies by the exact weights in float32: only the bfloat16 output rounding remains."""
    raw, kind, reference = packed_tensor
    layer = layer_of(raw, kind, out_float=out_float)
    for rows in (1, 3, 7, 16):
        x = bf16_inputs(rows, reference.shape[1], seed=rows)
        y = layer(x)
        assert y.shape == (rows, reference.shape[0])
        assert y.dtype == (torch.float32 if out_float else torch.bfloat16)
        expected = x.float() @ reference.T
        error = (y.float() - expected).abs()
        if out_float:
            assert (error <= 1e-5 * expected.abs().max(dim=1, keepdim=True).values).all(), rows
        else:  # within half a bfloat16 step of the float32 result, plus the float32 summation's slack
            assert (error <= 2 ** -8 * expected.abs() + 1e-5 * expected.abs().max()).all(), rows


@needs_kernel
def test_each_row_is_bitwise_the_same_alone_or_in_a_batch(packed_tensor):
    raw, kind, reference = packed_tensor
    layer = layer_of(raw, kind, out_float=True)
    x = bf16_inputs(19, reference.shape[1])  # blocks of rows of every size, and a partial one
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
    codes, scales, offsets = quantize_int4(weight)
    assert codes.shape == weight.shape and scales.shape == offsets.shape == (64, 256 // GROUP_SIZE)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    step = scales.repeat_interleave(GROUP_SIZE, dim=1)
    slack = 1e-6 * (weight.abs() + step)
    assert ((grouped(codes, scales, offsets) - weight).abs() <= step / 2 + slack).all()
    varied = scales > 1e-9
    groups = codes.reshape(*scales.shape, GROUP_SIZE)
    assert (groups.amin(-1)[varied] == 0).all() and (groups.amax(-1)[varied] == 15).all()
    assert ((Int4Linear.from_codes(*quantize_int4(weight)).dequantize() - weight).abs() <= step / 2 + slack).all()

    codes, scales = quantize_int8(weight)
    assert int(codes.abs().max()) == 127 and not codes[5].any()
    step = scales.repeat_interleave(GROUP_SIZE, dim=1)
    assert ((grouped(codes, scales) - weight).abs() <= step / 2 + 1e-6 * weight.abs()).all()
    assert torch.equal(Int8Linear.from_codes(*quantize_int8(weight)).dequantize(), grouped(codes, scales))
    for quantize in (quantize_int4, quantize_int8):
        with pytest.raises(ValueError, match="divisible by 32"):
            quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8Linear.from_codes(*quantize_int8(torch.zeros(24, 64)))


@needs_kernel
def test_dense_copy_serves_the_rows_from_num_packed_rows_on(packed_tensor):
    raw, kind, reference = packed_tensor
    dense = bf16_inputs(*reference.shape, seed=1)
    layer = layer_of(raw, kind, dense_weight=dense)
    x = bf16_inputs(5, reference.shape[1])
    packed = layer_of(raw, kind)(x)
    assert not torch.equal(packed, x @ dense.T)
    assert torch.equal(layer(x), packed)
    for k in (0, 2, len(x)):
        y = layer(x, num_packed_rows=k)
        assert torch.equal(y[:k], packed[:k]), k
        assert torch.equal(y[k:], x[k:] @ dense.T), k


def test_without_the_kernel_every_row_uses_the_dense_weight(packed_tensor, monkeypatch):
    raw, kind, reference = packed_tensor
    monkeypatch.setattr(quant, "packed_linear_kernel", lambda bits: None)
    dense = reference.to(torch.bfloat16)
    x = bf16_inputs(4, reference.shape[1])
    assert torch.equal(layer_of(raw, kind, dense_weight=dense)(x), x @ dense.T)
    exact = layer_of(raw, kind)(x)  # no dense copy: the dequantised weight, in float32
    assert torch.allclose(exact.float(), x.float() @ reference.T, rtol=1e-2, atol=1e-3)


@needs_kernel
def test_fused_layers_give_exactly_the_separate_layers_outputs(gguf_file):
    weights = gguf_packed_weights(default_gguf_path())
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    dense = [bf16_inputs(weights[n][0].shape[0], 576, seed=i) for i, n in enumerate(names)]
    layers = [Int4Linear.from_codes(*weights[n], dense_weight=d) for n, d in zip(names, dense)]
    x = bf16_inputs(9, 576)
    separate = [layer(x, num_packed_rows=4) for layer in layers]
    fused = quant.fuse(layers)
    assert fused.out_features == sum(layer.out_features for layer in layers)
    assert torch.equal(fused(x, num_packed_rows=4)[:4], torch.cat(separate, dim=1)[:4])  # the packed rows
    assert torch.allclose(fused(x, num_packed_rows=4)[4:].float(), torch.cat(separate, dim=1)[4:].float(),
                          rtol=1e-2, atol=1e-2)  # the dense rows: one bigger matmul, rounded alike
    for layer, alone in zip(layers, separate):  # the given layers now read views of the fused buffers
        assert layer.codes.data_ptr() != 0 and torch.equal(layer(x, num_packed_rows=4), alone)
    assert layers[1].codes.data_ptr() == fused.codes[layers[0].codes.shape[0]:].data_ptr()
    assert quant.fuse([layers[0], Int8Linear.from_codes(*quantize_int8(torch.randn(32, 576)))]) is None


def test_gguf_packed_weights_are_the_unpermuted_dequantized_weights(gguf_file):
    path = default_gguf_path()
    weights = gguf_packed_weights(path)
    layers = gguf_file.metadata["llama.block_count"]
    assert set(weights) == {f"model.layers.{i}.{p}.weight" for i in range(layers) for p in PROJECTIONS} | {
        "lm_head.weight"}  # the tied Q8_0 embedding, as the output head
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        hf_name = f"model.layers.0.{name}.weight"
        assert torch.equal(grouped(*weights[hf_name]), state[hf_name]), name
    assert torch.equal(grouped(*weights["lm_head.weight"]), state["model.embed_tokens.weight"])
    as_stored = gguf_q4_codes(gguf_file.tensor_bytes(gguf_file.tensors["blk.0.attn_q.weight"]), "Q4_1")
    assert not torch.equal(grouped(*as_stored), state["model.layers.0.self_attn.q_proj.weight"])


def test_gguf_packed_weights_take_only_exact_types(tmp_path):
    types = {"token_embd": Q.Q4_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.F32, "output": Q.Q4_1}
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
        data = rng.standard_normal(shape, dtype=np.float32)
        writer.add_tensor(f"{'' if name in ('token_embd', 'output') else 'blk.0.'}{name}.weight",
                          gguf.quants.quantize(data, types[name]), raw_dtype=types[name])
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    weights = gguf_packed_weights(path)  # the untied embedding is looked up, never multiplied: left out
    expected = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert sorted(weights) == sorted([f"model.layers.0.{p}.weight" for p in expected] + ["lm_head.weight"])
    assert len(weights["model.layers.0.self_attn.v_proj.weight"]) == 2  # Q8_0: codes and scales
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    for name, parts in weights.items():
        assert torch.equal(grouped(*parts), state[name]), name

    config = config_from_gguf(path)  # the loader's packing step, on a model built from the file's weights
    for bits, expected_types in ((None, (Int8Linear, Int4Linear, nn.Linear, nn.Linear, Int4Linear)),
                                 (4, (Int8Linear, Int4Linear, Int4Linear, Int4Linear, Int4Linear))):
        model = build_model(config, state.items(), dtype=torch.bfloat16)
        _quantize(model, path, bits)
        block = model.model.layers[0]
        layers = (block.self_attn.v_proj, block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.down_proj,
                  model.lm_head)  # Q8_0, Q4_0, F16, F32, Q4_1: the others quantised at load when asked
        assert tuple(type(m) for m in layers) == expected_types, bits
        assert torch.equal(layers[0].dequantize(), state["model.layers.0.self_attn.v_proj.weight"])


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
    assert all(isinstance(m, Int4Linear) for m in linears)
    assert type(model.lm_head) is Int8Linear  # the tied Q8_0 embedding; prompt rows use the embedding itself
    assert model.lm_head.dense_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    packed_rows = []

    def record(_, args, kwargs):
        packed_rows.append(kwargs.get("num_packed_rows", args[1] if len(args) > 1 else None))

    model.model.layers[0].self_attn.qkv_proj.register_forward_pre_hook(record, with_kwargs=True)

    ids = loaded.tokenizer.encode_prompt("The capital of France is")
    cache = KVCache(loaded.config, num_blocks=1, block_size=len(ids) + 16, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(ForwardBatch.build([SequenceChunk(0, 0, ids)]), cache)
        out = [int(logits[0].argmax())]
        while len(out) < 16:
            chunk = SequenceChunk(0, len(ids) + len(out) - 1, out[-1:], decode=True)
            out.append(int(model(ForwardBatch.build([chunk]), cache)[0].argmax()))
    assert packed_rows == [0] + [1] * 15
    text = loaded.tokenizer.decode(out)
    assert "Paris" in text, text
