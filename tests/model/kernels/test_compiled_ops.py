"""The ops' C entry points for compiled steps (model/kernels/compiled_ops.c): a graph compiled with them gives the
ops' own results bit for bit, strided inputs included, and its generated code calls them rather than Python."""

from __future__ import annotations

import pytest
import torch

from model.kernels.cpu import compiled_op_entry_points
import model.layers  # noqa: F401 - defines the elementwise ops
import model.rope  # noqa: F401
from model.quant import PackedLinear, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(compiled_op_entry_points() is None,
                                reason="the C entry points need the CPU kernels (a C compiler, AVX-512 BF16)")


def _ops(x, table, q, kv, k_cache, v_cache, host, w4: PackedLinear, w8: PackedLinear):
    # x[:, ::2] and kv[..., 1, :] are strided views: the entry points copy them as the Python ones do
    y = torch.ops.llama3.packed_linear(x[:, ::2], w4.codes, w4.high, w4.scales, w4.sub, w4.bits, w4.kind,
                                       w4.out_features, False)
    z = torch.ops.llama3.packed_linear(y, w8.codes, w8.high, w8.scales, w8.sub, w8.bits, w8.kind, w8.out_features,
                                       True)
    k, v = kv[:, 0], kv[:, 1]  # [B, Hkv, D] views of [B, 2, Hkv, D]
    out = torch.ops.llama3.decode_attention(q * 1, k, v, k_cache, v_cache, table, host, "sdpa")
    # the elementwise ops, on a strided slice, a strided row of heads and a fused gate/up output
    normed = torch.ops.llama3.rms_norm(x[:, ::2], x[0, :256] * 2, 1e-5)
    rotated = torch.ops.llama3.rope(kv[:, 0], table[:, :1].float().expand(-1, 32) * 0.1,
                                    table[:, :1].float().expand(-1, 32) * 0.2)
    act = torch.ops.llama3.silu_mul(torch.cat([y, y * 2], dim=1))
    return z, out, normed, rotated, act


def test_compiled_graph_calls_the_entry_points_and_matches_the_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    w4 = PackedLinear.from_weight(quantize_int4(torch.randn(64, 256, generator=gen)))
    w8 = PackedLinear.from_weight(quantize_int8(torch.randn(48, 64, generator=gen)))
    B, Hkv, G, D, S, blocks = 3, 2, 2, 64, 16, 8

    def inputs():
        g = torch.Generator().manual_seed(1)
        caches = [torch.randn(blocks, Hkv, S, D, generator=g).to(torch.bfloat16) for _ in range(2)]
        lengths = [(5, (1,)), (20, (2, 3)), (0, ())]  # a padding row last
        host = torch.tensor([[n, *t] + [0] * (2 - len(t)) for n, t in lengths], dtype=torch.long)
        return (torch.randn(B, 512, generator=g).to(torch.bfloat16), host,
                torch.randn(B, Hkv * G, D, generator=g).to(torch.bfloat16),
                torch.randn(B, 2, Hkv, D, generator=g).to(torch.bfloat16), *caches, host)

    eager_inputs, compiled_inputs = inputs(), inputs()
    with torch.no_grad():
        expected = _ops(*eager_inputs, w4, w8)
        compiled = torch.compile(_ops, fullgraph=True, options={
            "cpp_wrapper": True, "aot_inductor.custom_ops_to_c_shims": compiled_op_entry_points()})
        got = compiled(*compiled_inputs, w4, w8)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert torch.equal(eager_inputs[4], compiled_inputs[4]) and torch.equal(eager_inputs[5], compiled_inputs[5])
    generated = "".join(p.read_text() for p in tmp_path.rglob("*.cpp"))
    for op in ("packed_linear", "decode_attention", "rms_norm", "rope", "silu_mul"):
        assert f"aoti_torch_cpu_{op}(" in generated, op
