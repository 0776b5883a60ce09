"""Checkpoint loading: Hugging Face directories (one file or shards, tied head or not), a Hub cache read offline, and
the errors broken checkpoints give. The reference is `transformers.LlamaForCausalLM.from_pretrained` on the same
directory."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.batch import ForwardBatch, SequenceChunk
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCache
from model.llama import Llama
from model.loading import load
from model.paths import llama3_tokenizer_path
from model.text.chat_template import render_chat

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[3]
DATA = Path(__file__).resolve().parents[1] / "data"
ATOL = 1e-4
PROMPT = "The capital of France is Paris, and the capital of Japan is"
# A template no fallback could produce, so that rendering it proves it came from tokenizer_config.json.
MARKED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")


def tiny_config(tied: bool) -> ModelConfig:
    # The real Llama 3 vocabulary (so the real tokenizer fits) on a very narrow model.
    return ModelConfig(vocab_size=128_256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, rope_theta=500_000.0,
                       rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
                       max_position_embeddings=1024, tie_word_embeddings=tied)


def random_state(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensors by Hugging Face name; a tied checkpoint has no lm_head.weight, like the real ones."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).named_parameters()}  # a tied head is listed once
    gen = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=gen) * 0.2 for name, shape in shapes.items()}
    for name in state:
        if "norm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(state[name].shape, generator=gen)
    return state


def llama3_added_tokens() -> dict[str, dict]:
    """tokenizer_config.json's added_tokens_decoder, with the names the packaged tokenizer.json uses (Llama 3.0's:
    id 128008 is <|reserved_special_token_4|>, where Llama 3.1 and our default names have <|eom_id|>)."""
    data = json.loads((llama3_tokenizer_path().parent / "tokenizer.json").read_text())
    return {str(t["id"]): {"content": t["content"], "special": True} for t in data["added_tokens"]}


@dataclass(frozen=True)
class Layout:
    shards: int
    tied: bool
    dtype: torch.dtype
    tokenizer: str  # "json": tokenizer.json alone; "tiktoken": Meta's original/tokenizer.model next to it


LAYOUTS = {
    "single-tied": Layout(1, True, torch.float32, "json"),
    "single-untied": Layout(1, False, torch.float32, "json"),
    "sharded-tied": Layout(3, True, torch.bfloat16, "tiktoken"),
    "sharded-untied": Layout(3, False, torch.bfloat16, "tiktoken"),
}


def save_weights(directory: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[i::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(directory: Path, layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Hugging Face model directory as the Hub serves Llama 3; returns the tensors it holds."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(layout.tied)
    state = {name: t.to(layout.dtype) for name, t in random_state(config, seed).items()}
    save_weights(directory, state, layout.shards)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    shutil.copy(llama3_tokenizer_path().parent / "tokenizer.json", directory / "tokenizer.json")
    if layout.tokenizer == "tiktoken":
        (directory / "original").mkdir()
        shutil.copy(llama3_tokenizer_path(), directory / "original" / "tokenizer.model")
        tokenizer_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "added_tokens_decoder": llama3_added_tokens(),
                            "chat_template": (DATA / "llama3_1_instruct.jinja").read_text()}
        stops = [128001, 128009]
    else:
        tokenizer_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "chat_template": MARKED_TEMPLATE}
        # Llama 3.1's list. This tokenizer.json names 128008 <|reserved_special_token_4|>, so no name rule makes
        # it a stop token: only generation_config.json can.
        stops = [128001, 128008, 128009]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": stops}))
    return state


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def checkpoint(request, tmp_path_factory) -> tuple[Layout, Path, dict[str, torch.Tensor]]:
    layout = LAYOUTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    return layout, directory, write_checkpoint(directory, layout)


def our_logits(loaded, ids: list[int]) -> torch.Tensor:
    cache = KVCache(loaded.config, num_blocks=1, block_size=64)
    return loaded.model(ForwardBatch.build([SequenceChunk(0, 0, ids, all_logits=True)]), cache)  # [T, vocab]


def hf_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


# --- Hugging Face directories ---------------------------------------------------------------------------------

def test_directory_logits_match_transformers(checkpoint):
    layout, directory, state = checkpoint
    loaded = load(directory)
    assert loaded.config == tiny_config(layout.tied)
    assert loaded.source == str(directory)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # bfloat16 files are upcast on CPU
    ids = loaded.tokenizer.encode_prompt(PROMPT)
    torch.testing.assert_close(our_logits(loaded, ids), hf_logits(directory, ids), atol=ATOL, rtol=0)


def test_head_is_tied_or_read_from_the_file(checkpoint):
    layout, directory, state = checkpoint
    model = load(directory).model
    embed = model.model.embed_tokens.weight
    if layout.tied:
        assert "lm_head.weight" not in state
        assert model.lm_head.weight is embed
    else:
        assert model.lm_head.weight is not embed
        torch.testing.assert_close(model.lm_head.weight, state["lm_head.weight"].float(), atol=0, rtol=0)
    torch.testing.assert_close(embed, state["model.embed_tokens.weight"].float(), atol=0, rtol=0)


def test_tokenizer_template_and_stops_come_from_the_directory(checkpoint):
    layout, directory, _ = checkpoint
    tokenizer = load(directory).tokenizer
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.add_bos
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.encode_prompt("Hello world") == [128000, 9906, 1917]
    if layout.tokenizer == "tiktoken":
        # The names of added_tokens_decoder, not our Llama 3.1 defaults.
        assert tokenizer.token_to_id("<|reserved_special_token_4|>") == 128008
        assert tokenizer.token_to_id("<|eom_id|>") is None
        assert tokenizer.chat_template == (DATA / "llama3_1_instruct.jinja").read_text()
        assert tokenizer.eos_token_ids == {128001, 128009}
    else:
        assert tokenizer.chat_template == MARKED_TEMPLATE
        rendered = render_chat(tokenizer.chat_template, [{"role": "user", "content": "hi"}],
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        assert rendered == "<|begin_of_text|>[user] hi\n[assistant] "
        assert tokenizer.eos_token_ids == {128001, 128008, 128009}


# --- the Hugging Face Hub cache, offline ------------------------------------------------------------------------

def write_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay out `files` as huggingface_hub's cache does: content-addressed blobs, a snapshot folder of relative
    symlinks named by commit, and refs/main holding that commit (no trailing newline). Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in files.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_offline(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the Hub cache under `tmp_path` and the Hub switched off; huggingface_hub
    reads these variables once, at import, so only a new process sees them as a user's shell would set them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hub"))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_repo_id_loads_from_the_hub_cache_offline(tmp_path):
    source = tmp_path / "source"
    write_checkpoint(source, LAYOUTS["sharded-untied"], seed=1)
    snapshot = write_hub_cache(tmp_path / "hub", "meta-llama/Tiny-Llama-3", source)
    code = f"""
import json, torch
from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import load
loaded = load("meta-llama/Tiny-Llama-3")
ids = loaded.tokenizer.encode_prompt({PROMPT!r})
cache = KVCache(loaded.config, num_blocks=1, block_size=64)
logits = loaded.model(ForwardBatch.build([SequenceChunk(0, 0, ids, all_logits=True)]), cache)
torch.save(logits, {str(tmp_path / "logits.pt")!r})
print(json.dumps(dict(source=loaded.source, name=loaded.config.name, template=loaded.tokenizer.chat_template)))
"""
    result = run_offline(tmp_path, code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["source"] == "meta-llama/Tiny-Llama-3"
    assert report["name"] == snapshot.name  # the directory it loaded is the snapshot refs/main points to
    assert report["template"] == (DATA / "llama3_1_instruct.jinja").read_text()
    direct = load(source)
    ids = direct.tokenizer.encode_prompt(PROMPT)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), our_logits(direct, ids), atol=0, rtol=0)


def test_unknown_repo_id_offline_is_a_clear_error(tmp_path):
    (tmp_path / "hub").mkdir()
    code = """
from model.loading import load
try:
    load("meta-llama/Not-In-The-Cache")
except ValueError as e:
    print("ValueError:", e)
"""
    result = run_offline(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ValueError: model 'meta-llama/Not-In-The-Cache' is not in the local Hugging "
                                    "Face cache and cannot be downloaded (offline"), result.stdout


# --- broken checkpoints: every problem is a ValueError that names it -------------------------------------------

@pytest.fixture
def good(tmp_path) -> Path:
    """A fresh sharded checkpoint to break (three shards; the tokenizer is tokenizer.json alone)."""
    directory = tmp_path / "ckpt"
    write_checkpoint(directory, Layout(3, True, torch.float32, "json"))
    return directory


def index_of(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def rewrite_shard(directory: Path, name: str, change) -> Path:
    """Rewrite the shard holding tensor `name` with `change(tensors)` applied."""
    from safetensors.torch import load_file

    shard = directory / index_of(directory)[name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    return shard


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no config\.json: not a Hugging Face model directory"):
        load(good)


def test_unsupported_architecture(good):
    config = json.loads((good / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture \['MistralForCausalLM'\].*only LlamaForCausalLM"):
        load(good)


def test_config_that_is_not_json_or_lacks_a_field(good):
    (good / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read model config .*config\.json"):
        load(good)
    config = tiny_config(True).to_hf_config()
    del config["hidden_size"]
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks the field 'hidden_size'"):
        load(good)


def test_shard_listed_in_the_index_but_missing(good):
    (good / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json lists shards that are missing from .*: "
                                         r"model-00002-of-00003\.safetensors"):
        load(good)


def test_broken_index(good):
    (good / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"index\.json is not a valid safetensors index"):
        load(good)


def test_no_weights(good):
    for file in good.glob("model*"):
        file.unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        load(good)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(good, damage):
    shard = good / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00\xffnot safetensors" * 64,
                       "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"cannot read .*model-00003-of-00003\.safetensors: .*deserializing header"):
        load(good)


def test_tensor_with_the_wrong_shape(good):
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_shard(good, name, lambda t: t.update({name: t[name][:, :16].contiguous()}))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has shape \(32, 16\), "
                                         r"the model expects \(32, 64\)"):
        load(good)


def test_missing_tensor(good):
    name = "model.layers.0.self_attn.v_proj.weight"
    rewrite_shard(good, name, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model\.layers\.0\.self_attn\.v_proj\.weight"):
        load(good)


def test_tensor_that_is_not_llama(good):
    name = "model.layers.0.self_attn.q_proj.weight"
    bias = "model.layers.0.self_attn.q_proj.bias"
    rewrite_shard(good, name, lambda t: t.update({bias: torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' is not part of a Llama model"):
        load(good)


def test_directory_without_a_tokenizer(good):
    (good / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no supported tokenizer in .*tokenizer\.json"):
        load(good)


def test_sentencepiece_tokenizer_is_named(good):
    (good / "tokenizer.json").unlink()
    (good / "tokenizer.model").write_bytes(b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00")  # protobuf, not tiktoken
    with pytest.raises(ValueError, match="SentencePiece tokenizer.model is not supported"):
        load(good)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip", b'{"weight_map": {}}'], ids=["empty", "zip", "json"])
def test_file_that_is_not_gguf(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.bin is not a GGUF file; pass a \.gguf file, a model directory"):
        load(path)


def test_safetensors_file_instead_of_its_directory(good):
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load(good / "model-00001-of-00003.safetensors")


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such-model.gguf"
    message = f"model {str(missing)!r} is neither a file, a directory nor a Hugging Face repo id"
    with pytest.raises(ValueError, match=re.escape(message)):
        load(missing)


# --- the KV cache's size report ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_cache_nbytes(dtype):
    config = ModelConfig(vocab_size=256, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=128, head_dim=24)
    slots, max_len = 5, 48
    cache = KVCache(config, num_blocks=slots, block_size=max_len, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    expected = config.num_hidden_layers * 2 * slots * config.num_key_value_heads * max_len * config.head_dim * elem
    assert cache.nbytes == expected
    assert KVCache.bytes_per_token(config, dtype) * slots * max_len == expected


def test_float_checkpoint_opts_into_int4_at_load(tmp_path):
    """`quantization="int4"` on a safetensors checkpoint: every decoder linear becomes packed int4 within half a
    quantisation step of the checkpoint's weight, the output head int8, and generated tokens' logits equal
    transformers' run with those dequantised weights (up to bfloat16 activations in the packed layers)."""
    from model.quant import GROUP_SIZE, PackedLinear

    state = write_checkpoint(tmp_path, LAYOUTS["single-untied"])
    loaded = load(str(tmp_path), quantization="int4")
    layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, PackedLinear) and m.bits == 4}
    fused = {name for name in layers if name.endswith(("qkv_proj", "gate_up_proj"))}
    assert len(fused) == 2 * loaded.config.num_hidden_layers
    layers = {name: m for name, m in layers.items() if name not in fused}
    assert len(layers) == 7 * loaded.config.num_hidden_layers
    assert isinstance(loaded.model.lm_head, PackedLinear) and loaded.model.lm_head.bits == 8
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    head = state["lm_head.weight"].float()
    step = head.reshape(head.shape[0], -1, GROUP_SIZE).abs().amax(-1).repeat_interleave(GROUP_SIZE, 1) / 127
    assert ((loaded.model.lm_head.dequantize() - head).abs() <= step / 2 + 1e-6).all()
    hf.lm_head.weight.data = loaded.model.lm_head.dequantize()
    for name, layer in layers.items():
        weight = state[f"{name}.weight"].float()
        groups = weight.reshape(weight.shape[0], -1, GROUP_SIZE)
        step = (groups.amax(-1) - groups.amin(-1)) / 15  # [N, K / 32]
        error = (layer.dequantize() - weight).abs().reshape_as(groups)
        assert (error <= step[..., None] / 2 + 0.01 * groups.abs().amax(-1, keepdim=True)).all(), name
        hf.get_submodule(name).weight.data = layer.dequantize()
    ids = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]
    cache = KVCache(loaded.config, 1, 64)  # every token as a generated one, so every token meets the int4 weights
    ours = torch.cat([loaded.model(ForwardBatch.build([SequenceChunk(0, i, ids[i:i + 1], decode=True)]), cache)
                      for i in range(len(ids))])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    ratio = ((ours - expected).norm() / expected.norm()).item()
    assert ratio < 0.02, ratio
