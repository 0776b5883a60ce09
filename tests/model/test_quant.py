"""Int4 linear layers (model/quant.py), checked against gguf's own dequantisation, dense matmuls and the float model."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from model.batch import ForwardBatch, SequenceChunk
from model.default import default_gguf_path
from model.gguf import gguf_int4_weights, load_gguf_state_dict
from model.gguf_file import GGUFFile
from model.kv_cache import KVCache
from model.loading import load
from model.quant import GROUP_SIZE, Int4Linear, bfloat16_scales, gguf_q4_codes, quantize_int4

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def grouped(codes, scales, zeros):
    """(codes - 8) * scale + zero, one (scale, zero) per group of 32 input features, in float32."""
    N, K = codes.shape
    q = codes.float().reshape(N, K // GROUP_SIZE, GROUP_SIZE) - 8
    return (q * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def bf16_inputs(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def gguf_file():
    return GGUFFile(default_gguf_path())


@pytest.fixture(scope="module", params=["Q4_1", "Q4_0"])
def q4_tensor(request, gguf_file):
    """(raw bytes, kind, gguf's float32 dequantisation): a real Q4_1 tensor of the default GGUF, or a Q4_0 one
    quantised by gguf from random weights (with one all-zero row, whose blocks have d = 0)."""
    if request.param == "Q4_1":
        info = gguf_file.tensors["blk.0.ffn_gate.weight"]
        assert info.qtype == Q.Q4_1
        raw, qtype = gguf_file.tensor_bytes(info), info.qtype
    else:
        weights = np.random.default_rng(0).standard_normal((128, 576), dtype=np.float32) * 0.05
        weights[7] = 0
        raw, qtype = gguf.quants.quantize(weights, Q.Q4_0), Q.Q4_0
    return raw, request.param, torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())


def test_gguf_q4_codes_reproduce_gguf_dequantize_exactly(q4_tensor):
    raw, kind, reference = q4_tensor
    codes, scales, zeros = gguf_q4_codes(raw, kind)
    N, K = reference.shape
    assert codes.shape == (N, K) and scales.shape == zeros.shape == (N, K // GROUP_SIZE)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    if kind == "Q4_0":
        assert not zeros.any()
    assert torch.equal(grouped(codes, scales, zeros), reference)


def test_int4_linear_matches_matmul_with_gguf_weight(q4_tensor):
    raw, kind, reference = q4_tensor
    layer = Int4Linear.from_codes(*gguf_q4_codes(raw, kind))
    for rows in (1, 3, 16):
        x = bf16_inputs(rows, reference.shape[1], seed=rows)
        y = layer(x)
        assert y.shape == (rows, reference.shape[0]) and y.dtype == torch.bfloat16
        expected = x.float() @ reference.T
        assert (y.float() - expected).norm() < 1e-2 * expected.norm(), rows
    assert (layer.dequantize() - reference).norm() < 1e-2 * reference.norm()


def test_each_row_is_bitwise_the_same_alone_or_in_a_batch(q4_tensor):
    raw, kind, reference = q4_tensor
    layer = Int4Linear.from_codes(*gguf_q4_codes(raw, kind))
    x = bf16_inputs(16, reference.shape[1])
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(batched[i], layer(x[i:i + 1])[0]), i


def test_bfloat16_scales_never_worse_than_round_to_nearest(q4_tensor):
    raw, kind, _ = q4_tensor
    codes, scales, zeros = gguf_q4_codes(raw, kind)
    chosen_scales, chosen_zeros = bfloat16_scales(codes, scales, zeros)
    assert chosen_scales.dtype == chosen_zeros.dtype == torch.bfloat16
    for chosen, exact in ((chosen_scales, scales), (chosen_zeros, zeros)):
        assert ((chosen.float() - exact).abs() <= exact.abs() * 2 ** -7).all()  # at most one bf16 step away
    target = grouped(codes, scales, zeros)

    def group_error(s, z):
        return ((grouped(codes, s, z) - target) ** 2).reshape(*scales.shape, GROUP_SIZE).sum(-1)

    best = group_error(chosen_scales, chosen_zeros)
    nearest = group_error(scales.to(torch.bfloat16), zeros.to(torch.bfloat16))
    assert (best <= nearest).all()
    if kind == "Q4_1":
        assert best.sum() < nearest.sum()
    else:  # with zero 0 the error is (s' - s)^2 * sum(q^2): the nearest scale is the best one
        assert torch.equal(best, nearest)


def test_quantize_int4_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    spread = torch.logspace(-3, 1, 64)[:, None]
    weight = torch.randn(64, 256, generator=gen) * spread + torch.randn(64, 1, generator=gen)
    weight[3, 32:64] = 0.25
    codes, scales, zeros = quantize_int4(weight)
    assert codes.shape == weight.shape and scales.shape == zeros.shape == (64, 256 // GROUP_SIZE)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    step = scales.repeat_interleave(GROUP_SIZE, dim=1)
    float_slack = 1e-6 * (weight.abs() + 8 * step)
    assert ((grouped(codes, scales, zeros) - weight).abs() <= step / 2 + float_slack).all()
    varied = scales > 1e-9
    groups = codes.reshape(*scales.shape, GROUP_SIZE)
    assert (groups.amin(-1)[varied] == 0).all() and (groups.amax(-1)[varied] == 15).all()

    zero = zeros.repeat_interleave(GROUP_SIZE, dim=1)
    bf16_slack = 2 ** -7 * (8 * step + zero.abs()) + 2 ** -8 * (weight.abs() + step)
    dequantized = Int4Linear.quantize(weight).dequantize()
    assert ((dequantized - weight).abs() <= step / 2 + bf16_slack).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.zeros(4, 48))


def test_dense_copy_serves_the_rows_from_num_packed_rows_on(q4_tensor):
    raw, kind, reference = q4_tensor
    codes, scales, zeros = gguf_q4_codes(raw, kind)
    dense = bf16_inputs(*reference.shape, seed=1)
    layer = Int4Linear.from_codes(codes, scales, zeros, dense_weight=dense)
    x = bf16_inputs(5, reference.shape[1])
    packed = Int4Linear.from_codes(codes, scales, zeros)(x)
    assert not torch.equal(packed, x @ dense.T)
    assert torch.equal(layer(x), packed)
    for k in (0, 2, len(x)):
        y = layer(x, num_packed_rows=k)
        assert torch.equal(y[:k], packed[:k]), k
        assert torch.equal(y[k:], x[k:] @ dense.T), k


def test_gguf_int4_weights_are_the_unpermuted_dequantized_weights(gguf_file):
    path = default_gguf_path()
    weights = gguf_int4_weights(path)
    layers = gguf_file.metadata["llama.block_count"]
    assert set(weights) == {f"model.layers.{i}.{p}.weight" for i in range(layers) for p in PROJECTIONS}
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        hf_name = f"model.layers.0.{name}.weight"
        assert torch.equal(grouped(*weights[hf_name]), state[hf_name]), name
    as_stored = gguf_q4_codes(gguf_file.tensor_bytes(gguf_file.tensors["blk.0.attn_q.weight"]), "Q4_1")
    assert not torch.equal(grouped(*as_stored), state["model.layers.0.self_attn.q_proj.weight"])


def test_gguf_int4_weights_take_only_4_bit_linears(tmp_path):
    types = {"token_embd": Q.Q4_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
             "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_0, "output": Q.Q4_1}
    shapes = {"token_embd": (96, 64), "attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64),
              "attn_output": (64, 64), "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128),
              "output": (96, 64)}
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {"block_count": 1, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
                       "attention.head_count": 2, "attention.head_count_kv": 1, "vocab_size": 96}.items():
        writer.add_uint32(f"llama.{key}", value)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        data = rng.standard_normal(shape, dtype=np.float32)
        writer.add_tensor(f"{'' if name in ('token_embd', 'output') else 'blk.0.'}{name}.weight",
                          gguf.quants.quantize(data, types[name]), raw_dtype=types[name])
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    weights = gguf_int4_weights(path)
    expected = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(weights) == sorted([f"model.layers.0.{p}.weight" for p in expected] + ["lm_head.weight"])
    state = load_gguf_state_dict(path, torch.float32, use_cache=False)
    for name, parts in weights.items():
        assert torch.equal(grouped(*parts), state[name]), name


@pytest.mark.parametrize("kwargs, match", [(dict(quantization="int4", device="cuda"), "CPU"),
                                           (dict(quantization="int4", device="meta"), "CPU"),
                                           (dict(quantization="int8"), "unknown quantization")])
def test_load_refuses_int4_off_cpu_and_unknown_quantizations(kwargs, match):
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
def test_int4_model_from_gguf_knows_the_capital_of_france(one_thread):
    loaded = load(None, dtype=torch.bfloat16, quantization="int4")
    model = loaded.model
    linears = [m for m in model.model.layers.modules() if isinstance(m, (nn.Linear, Int4Linear))]
    assert len(linears) == len(PROJECTIONS) * loaded.config.num_hidden_layers
    assert all(isinstance(m, Int4Linear) for m in linears)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16

    packed_rows = []

    def record(_, args, kwargs):
        packed_rows.append(kwargs.get("num_packed_rows", args[1] if len(args) > 1 else None))

    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record, with_kwargs=True)

    ids = loaded.tokenizer.encode_prompt("The capital of France is")
    cache = KVCache(loaded.config, num_slots=1, max_seq_len=len(ids) + 16, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(ForwardBatch.build([SequenceChunk(0, 0, ids)]), cache)
        out = [int(logits[0].argmax())]
        while len(out) < 16:
            chunk = SequenceChunk(0, len(ids) + len(out) - 1, out[-1:], decode=True)
            out.append(int(model(ForwardBatch.build([chunk]), cache)[0].argmax()))
    assert packed_rows == [0] + [1] * 15
    text = loaded.tokenizer.decode(out)
    assert "Paris" in text, text
