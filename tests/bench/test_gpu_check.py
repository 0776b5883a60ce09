"""bench/gpu_check.sh end to end in its CPU dry-run mode: every section runs and reports (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for section in ("device", "sdpa", "tests", "parity", "throughput", "speculation", "transformers", "server",
                    "summary"):
        assert f"=== {section} ===" in done.stdout
    assert "all sections passed" in done.stdout
    results = json.loads((tmp_path / "gpu_check" / "gpu_check.json").read_text())["results"]
    assert results["parity"]["passed"]
    assert set(results["throughput"]["decode_tokens_per_s"]) == {"1", "4"}
    assert 0 < results["throughput"]["batch1_fraction_of_bandwidth_limit"]
    speculation = results["speculation"]
    assert speculation["verify"]["verify_rows_exact"]["argmax_equal"] and speculation["engine"]["outputs_equal"]
    assert speculation["engine"]["accepted_tokens"] > 0 and speculation["verify"]["draft_step_ms"] > 0
    assert results["transformers"]["output_tokens"] == 6 * 8  # greedy, no early stop: every token generated
    assert all(level["completed"] > 0 and level["failed"] == 0 for level in results["server"]["levels"].values())
    assert any("KV cache" in line for line in results["server"]["log"])
    bench = json.loads((tmp_path / "gpu_check" / "bench.json").read_text())
    assert [run["max_concurrency"] for run in bench["runs"]] == [1, 4] and bench["prompts"]["exact"]
