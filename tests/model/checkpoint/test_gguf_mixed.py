"""A GGUF that mixes types per tensor as llama.cpp's `_K_M` recipes do (Q5_0 where rows are not a multiple of 256,
Q8_0, Q4_K and Q6_K where they are), made from the embedded model: served exactly in the exact configuration
(greedy continuations equal `transformers` loading the same file) and packed as stored in the fast one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from model.kernels.cpu import packed_linear_kernel
from model.loading import load
from model.paths import default_gguf_path
from tests.model.checkpoint.test_gguf import random_kquant

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # from_pretrained(gguf_file=...) needs it

pytestmark = pytest.mark.slow  # transformers takes about 15 s to read a GGUF

K_QUANT_LAYERS = {3: Q.Q4_K, 7: Q.Q6_K, 11: Q.Q4_K, 15: Q.Q6_K}  # ffn_down: 1,536 inputs, a multiple of 256


def recipe(name: str) -> Q | None:
    """The type a tensor gets (None: kept as stored)."""
    if name.endswith("ffn_down.weight"):
        layer = int(name.split(".")[1])
        return K_QUANT_LAYERS.get(layer, Q.Q5_0)
    if name.endswith("attn_v.weight"):
        return Q.Q8_0
    if name.startswith("blk.") and name.endswith(("attn_q.weight", "attn_k.weight", "attn_output.weight",
                                                  "ffn_gate.weight", "ffn_up.weight")):
        return Q.Q5_1 if name.endswith("ffn_up.weight") else Q.Q5_0
    return None


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """The default model rewritten with the types of `recipe`: legacy types quantised by gguf from the stored
    weights; the K-quant tensors are random blocks with small scales (gguf cannot write K-quants), which keeps
    the model close to the original while every K-quant code path is exercised."""
    reader = gguf.GGUFReader(default_gguf_path())
    path = tmp_path_factory.mktemp("mixed") / "SmolLM2-135M-mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        qtype = recipe(tensor.name)
        if qtype is None:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, cols]
        if qtype in (Q.Q4_K, Q.Q6_K):
            size = gguf.GGML_QUANT_SIZES[qtype][1]
            blocks = random_kquant(rng, *weights.shape, qtype).reshape(weights.shape[0], -1, size)
            where = slice(208, 210) if qtype == Q.Q6_K else slice(0, 4)  # d (Q6_K), or d and dmin
            small = rng.uniform(1e-5, 3e-5, (*blocks.shape[:2], (where.stop - where.start) // 2))
            blocks[..., where] = small.astype(np.float16).view(np.uint8)
            raw = blocks.reshape(weights.shape[0], -1)
        else:
            raw = gguf.quants.quantize(weights, qtype)
        writer.add_tensor(tensor.name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_mix_is_what_the_recipe_wrote(mixed_gguf):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(mixed_gguf).tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in K_QUANT_LAYERS} == {Q.Q4_K, Q.Q6_K}
    assert {Q.Q5_0, Q.Q5_1, Q.Q8_0} <= set(types.values())


def test_exact_configuration_matches_transformers_on_the_same_file(mixed_gguf):
    ours = load(mixed_gguf, dtype=torch.float32, quantization="none")
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name,
                                                           dtype=torch.float32).eval()
    for prompt in ("The quick brown fox", "def fibonacci(n):\n", "La tour Eiffel est située à"):
        ids = ours.tokenizer.encode_prompt(prompt)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
        assert greedy(ours, ids, 16) == expected[0, len(ids):].tolist(), prompt


def greedy(loaded, ids: list[int], new_tokens: int) -> list[int]:
    from model.batch import ForwardBatch, SequenceChunk
    from model.kv_cache import KVCache

    cache = KVCache(loaded.config, num_blocks=1, block_size=len(ids) + new_tokens)
    logits = loaded.model(ForwardBatch.build([SequenceChunk(0, 0, ids)]), cache)
    out = [int(logits[0].argmax())]
    while len(out) < new_tokens:
        chunk = SequenceChunk(0, len(ids) + len(out) - 1, out[-1:], decode=True)
        out.append(int(loaded.model(ForwardBatch.build([chunk]), cache)[0].argmax()))
    return out


@pytest.mark.skipif(packed_linear_kernel() is None, reason="needs the packed linear kernel")
def test_fast_configuration_serves_every_tensor_packed_as_stored(mixed_gguf):
    from model.quant import PackedLinear

    loaded = load(mixed_gguf, dtype=torch.bfloat16, quantization="auto")
    layers = loaded.model.model.layers
    bits = {i: layers[i].mlp.down_proj.bits for i in K_QUANT_LAYERS}
    assert bits == {3: 4, 7: 6, 11: 4, 15: 6}
    assert layers[0].mlp.down_proj.bits == 5 and layers[0].self_attn.v_proj.bits == 8
    dense = [name for name, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)
             and not isinstance(m, PackedLinear)]
    assert dense == []
