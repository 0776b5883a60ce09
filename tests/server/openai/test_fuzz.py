"""The OpenAPI document against the server, under schemathesis with all of its checks.

A few hundred generated requests per operation, from the document the server itself serves; none may fail a
check, and the server must be healthy and hold no cache memory afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.openai.app import create_app
from server.openai.openapi import below
from server.openai.limits import Limits
from tests.server.conftest import LiveServer, make_engine, run_uvicorn, server_state

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))  # FUZZ_EXAMPLES=200 for a longer run (75 until the suite outgrew 15 min)


def schemathesis_cli() -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return [exe]


@pytest.mark.slow
def test_schemathesis_finds_nothing(tiny_llama3, tmp_path):
    cli = schemathesis_cli()
    # Operator limits keep each generated request short (the document states them, so the fuzzer keeps to them);
    # the requests are still every shape the document allows.
    limits = Limits(max_tokens=4, n=4, prompts=4)
    state = server_state("tiny-fuzz", make_engine(tiny_llama3, max_model_len=256, max_num_seqs=8,
                                                  max_num_batched_tokens=256), limits=limits)
    with run_uvicorn(create_app(state)) as url:
        server = LiveServer(url, state)
        # The grammar compiler is built on the first constrained request (a few seconds for a 128k vocabulary);
        # build it now, so that schemathesis' response-time check measures requests rather than that.
        warm = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "prompt": "x", "max_tokens": 2, "response_format": {"type": "json_object"}})
        assert warm.status_code == 200, warm.text
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.server.openai.fuzz_checks",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run(
            [*cli, "run", f"{server.url}/openapi.json", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES),
             "--seed", "20261130", "--no-color", "--request-timeout", "60", "--max-failures", "10"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        report = result.stdout + result.stderr
        assert result.returncode == 0, report[-8000:]
        generated = int(report.split("Test cases:")[1].split("generated")[0].strip())
        assert generated >= 13 * EXAMPLES * 2, report[-3000:]  # a few hundred per operation did run

        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert server.wait_until_idle(timeout=30) >= 0
        assert server.slots_used() == 0


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 37, 100, 101, 1000, 49152, 128256])
def test_the_token_id_key_pattern_matches_exactly_the_ids_below_the_vocabulary(n):
    """logit_bias keys are bounded in the OpenAPI document by a regular expression built from the vocabulary."""
    pattern = re.compile(f"^({below(n)})$")
    assert [i for i in range(3 * n + 20) if pattern.match(str(i))] == list(range(n))
    assert not any(pattern.match(s) for s in ["", "01", "-1", "+1", " 1", "1.0"])
