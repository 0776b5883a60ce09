"""`python -m server`'s command line: generated from EngineConfig and ServerConfig, so each default and choice is
stated once and shown by --help; presets set the same fields and are checked against them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.quant import QUANTIZATIONS
from server.cli import build_parser, options, resolve_settings
from server.engine.config import EngineConfig
from server.openai.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_no_flags_give_the_dataclass_defaults():
    engine, server = resolve_settings([])
    assert engine == EngineConfig()
    assert server == ServerConfig()


def test_every_field_is_a_flag_with_its_default_in_the_help():
    help_text = " ".join(subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.split())
    for cls in (EngineConfig, ServerConfig):
        for field, _ in options(cls):
            flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
            assert flag in help_text, flag
    assert "sequences decoding at once (default: 32)" in help_text
    assert "{" + ",".join(QUANTIZATIONS) + "}" in help_text  # choices come from model.quant, not a copy
    assert "(default: bfloat16)" in help_text and "(default: 127.0.0.1)" in help_text


def test_flags_override_the_preset_which_overrides_the_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"max-num-seqs": 8, "port": 9000, "dtype": "float32",
                                      "enable_prefix_caching": False, "limits": {"n": 3}}))
    engine, server = resolve_settings(["--config", str(preset), "--max-num-seqs", "4", "--enable-prefix-caching"])
    assert (engine.max_num_seqs, engine.dtype, engine.enable_prefix_caching) == (4, "float32", True)
    assert (server.port, server.limits.n) == (9000, 3)
    assert engine.max_model_len == EngineConfig().max_model_len


@pytest.mark.parametrize("content, message", [
    ({"max_num_seqs": 8, "speed": 3}, r"unknown option\(s\) in .*: speed"),
    ({"max_num_seqs": "eight"}, "max_num_seqs must be an integer"),
    ({"enforce_eager": "yes"}, "enforce_eager must be true or false"),
    ({"port": True}, "port must be an integer"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"max_num_seqs": 0}, "max_num_seqs must be positive"),
])
def test_a_bad_preset_is_an_error_naming_the_option(tmp_path, content, message):
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit, match=message):
        resolve_settings(["--config", str(preset)])


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_is_valid(preset):
    engine, server = resolve_settings(["--config", str(preset)])
    values = {k.replace("-", "_"): v for k, v in yaml.safe_load(preset.read_text()).items()}
    for name, value in values.items():
        assert getattr(engine if hasattr(engine, name) else server, name) == value, name


def test_the_served_name_follows_the_model_unless_given():
    assert resolve_settings(["--model", "meta-llama/Llama-3.2-1B/"])[1].served_model_name == "meta-llama/Llama-3.2-1B"
    assert resolve_settings(["--model", "x", "--served-model-name", "y"])[1].served_model_name == "y"
    assert resolve_settings([])[1].served_model_name == "SmolLM2-135M-Instruct"


def test_every_option_parses_from_its_flag():
    parser = build_parser()
    args = parser.parse_args(["--kv-cache-memory", "1GiB", "--allowed-origins", "a,b", "--limit", "n=2",
                              "--limit", "stop=1", "--gpu-memory-utilization", "0.5", "--request-timeout", "3"])
    assert args.kv_cache_memory == "1GiB" and args.limits == ["n=2", "stop=1"]
    engine, server = resolve_settings(["--kv-cache-memory", "1GiB", "--allowed-origins", "a, b", "--limit", "n=2"])
    assert engine.kv_cache_memory == 2**30 and server.allowed_origins == ("a", "b") and server.limits.n == 2


def test_a_model_that_cannot_be_served_exits_non_zero_naming_the_file(tmp_path):
    """A missing file, a tensor of a type no reader knows, a truncated file: one line naming the file (and the
    tensor and its type), and the process exits non-zero within seconds, never a server that stays up unready."""
    import time

    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from tests.model.checkpoint.test_gguf import random_hf_state_dict, tiny_hf_config, write_llama_gguf
    from tests.server.conftest import free_port

    hf_cfg = tiny_hf_config()
    odd = tmp_path / "odd-type.gguf"
    write_llama_gguf(odd, hf_cfg, random_hf_state_dict(hf_cfg),
                     change={"blk.0.attn_v.weight": (np.ones((128, 256), np.int8), Q.I8)})
    whole = tmp_path / "whole.gguf"
    write_llama_gguf(whole, hf_cfg, random_hf_state_dict(hf_cfg))
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(whole.read_bytes()[:-1000])
    cases = [(tmp_path / "missing.gguf", "missing.gguf"),
             (odd, "odd-type.gguf: tensor 'blk.0.attn_v.weight' has type I8, which this server cannot read"),
             (cut, "truncated.gguf")]
    for path, words in cases:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "server", "--model", str(path), "--port", str(free_port()),
                               "--enforce-eager", "--log-level", "warning"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0, (path, done.stderr[-2000:])
        assert time.monotonic() - start < 60
        last = done.stderr.strip().splitlines()[-1]
        assert words in last and str(path.parent) in last, (path, last)


def test_the_compile_cache_lives_beside_the_weight_cache(tmp_path):
    """Inductor points its cache at /tmp when first imported, which the server's imports do: the server must claim
    the variable before them, or every restart (and every container) compiles the decode step again."""
    code = ("import atexit, os; atexit.register(lambda: print(os.environ['TORCHINDUCTOR_CACHE_DIR']));"
            "from server.__main__ import main; main(['--help'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["LLAMA3_SERVER_CACHE"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "inductor"), out.stderr[-2000:]


def test_sigterm_while_the_decode_step_compiles_in_the_background_exits_cleanly(tmp_path):
    """Healthy once loaded, the server is stopped while its step still compiles (an empty compile cache): it exits 0,
    not killed by the interpreter's finalisation under a compiling thread (it used to abort: SIGABRT)."""
    import signal
    import time

    from bench.launch import stop, wait_healthy
    from tests.server.conftest import free_port

    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--max-num-seqs", "2"], cwd=ROOT,
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, 240)
        time.sleep(3)  # into the compiler's C++ work (SIGTERM at once, still in Dynamo's Python, exited cleanly)
        assert "decode step compiled" not in log.read_text()  # still compiling
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text()[-3000:]
    finally:
        stop(server)
    assert "compiling the decode step in the background" in log.read_text()
