"""A short soak (bench/soak.py, about a minute): 32 clients of mixed traffic, a quarter of them abandoning
requests mid-way. Nothing fails for the clients that stay, nothing stays in the KV cache, memory stays flat."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from tests.server.conftest import TINY_NAME, live_server

SPEC = importlib.util.spec_from_file_location("bench_soak", Path(__file__).resolve().parents[2] / "bench" / "soak.py")
soak = sys.modules.setdefault("bench_soak", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(soak)


@pytest.mark.slow
def test_short_soak_loses_nothing(tiny_llama3):
    with live_server(tiny_llama3, TINY_NAME, max_model_len=512, max_num_seqs=16, max_waiting=256) as server:
        asyncio.run(soak.soak(server.url, TINY_NAME, seconds=10, clients=32))  # warm-up: allocator, caches
        server.wait_until_idle(timeout=30)

        async def run():
            task = asyncio.create_task(soak.soak(server.url, TINY_NAME, seconds=50, clients=32))
            await asyncio.sleep(10)
            return await task, soak.resident_bytes(os.getpid())

        started = time.monotonic()
        tally, rss_early = asyncio.run(run())
        assert time.monotonic() - started < 120
        left = soak.settle(server.url)
        rss_end = soak.resident_bytes(os.getpid())
    assert tally.failed == 0, tally.failures[:5]
    assert tally.completed > 100 and tally.abandoned > 10, (tally.completed, tally.abandoned)
    assert left == {"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0}
    assert rss_end < rss_early * 1.05, (rss_early / 2**20, rss_end / 2**20)
