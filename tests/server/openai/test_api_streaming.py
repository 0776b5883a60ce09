"""Requests over time: clients that leave early, many clients at once, and the real CLI shutting down gracefully."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import free_port, metric, scrape, sse_events

REPO_ROOT = Path(__file__).resolve().parents[3]
# As long as the context allows: a request that would run for tens of seconds unless it is aborted.
ENDLESS = {"prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}


def generated_total(server) -> int:
    return server.engine.stats().generation_tokens_total


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_frees_the_slot(tiny_server, endpoint):
    assert tiny_server.slots_used() == 0
    before = generated_total(tiny_server)
    body = {**ENDLESS, "stream": True}
    if endpoint.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": body.pop("prompt")}], **body}
    with tiny_server.http() as http, http.stream("POST", endpoint, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert tiny_server.slots_used() == 1
        during = scrape(tiny_server)
        assert metric(during, tiny_server, "num_requests_running") == 1
        stats = tiny_server.engine.stats()
        assert stats.blocks_used > 0
        assert metric(during, tiny_server, "kv_cache_usage_perc") == pytest.approx(  # a block may be added since
            stats.blocks_used / stats.num_blocks, abs=1.01 / stats.num_blocks)
        assert metric(during, tiny_server, "kv_cache_tokens") > 0
    # the client has closed the connection mid-stream
    tiny_server.wait_until_idle(timeout=2.0)
    assert generated_total(tiny_server) - before < ENDLESS["max_tokens"], "the request ran to its end"
    after = scrape(tiny_server)
    assert metric(after, tiny_server, "num_requests_running") == 0
    assert metric(after, tiny_server, "kv_cache_usage_perc") == 0


def test_sdk_stream_closed_early_frees_the_slot(tiny_server):
    before = generated_total(tiny_server)

    async def read_a_little():
        async with tiny_server.async_client() as client:
            stream = await client.completions.create(model=tiny_server.model, prompt="Hi", max_tokens=4000,
                                                     stream=True, extra_body={"ignore_eos": True})
            received = 0
            async for _ in stream:
                received += 1
                if received == 3:
                    break
            assert tiny_server.slots_used() == 1
            await stream.close()

    asyncio.run(read_a_little())
    tiny_server.wait_until_idle(timeout=2.0)
    assert generated_total(tiny_server) - before < 4000


def test_non_streaming_client_timeout_frees_the_slot(tiny_server):
    before = generated_total(tiny_server)
    with tiny_server.http(timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=ENDLESS)
    tiny_server.wait_until_idle(timeout=2.0)
    assert generated_total(tiny_server) - before < ENDLESS["max_tokens"], "the request ran to its end"

    before = generated_total(tiny_server)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.APITimeoutError):
        tiny_server.client(timeout=1.0).chat.completions.create(model=tiny_server.model, messages=messages,
                                                                max_tokens=4000, extra_body={"ignore_eos": True})
    tiny_server.wait_until_idle(timeout=2.0)
    assert generated_total(tiny_server) - before < 4000


def test_32_concurrent_streaming_clients(tiny_server):
    """Half completions, half chat, each with its own client; every token counted from the stream itself."""
    max_tokens, num_clients = 24, 32
    peak = 0

    async def one(i: int) -> tuple[int, int, str | None]:
        async with tiny_server.async_client() as client:
            common = dict(model=tiny_server.model, max_tokens=max_tokens, stream=True, seed=i,
                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            tokens, usage, finish = 0, None, None
            if i % 2:
                stream = await client.chat.completions.create(
                    messages=[{"role": "user", "content": f"Client {i} says hello"}], logprobs=True, **common)
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for c in chunk.choices:
                        tokens += len(c.logprobs.content) if c.logprobs else 0
                        finish = c.finish_reason or finish
            else:
                stream = await client.completions.create(prompt=f"Client {i} says hello", logprobs=0, **common)
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for c in chunk.choices:
                        tokens += len(c.logprobs.tokens)
                        finish = c.finish_reason or finish
            return tokens, usage.completion_tokens, finish

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, tiny_server.engine.stats().running)
            await asyncio.sleep(0.002)

    async def main():
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(one(i) for i in range(num_clients)))
        finally:
            watcher.cancel()

    results = asyncio.run(main())
    assert results == [(max_tokens, max_tokens, "length")] * num_clients
    assert peak > 1, "the requests never ran together"
    tiny_server.wait_until_idle(timeout=1.0)


@pytest.mark.slow
def test_cli_starts_serves_and_shuts_down_gracefully(tmp_path):
    """`python -m server`: /health is 503 while the model loads, then 200; on SIGTERM new requests and /health get
    503 with Retry-After while a running stream finishes; a stream that cannot finish within the grace period is
    cut off at its end, and the process exits 0 soon after it (one grace period, not two)."""
    port, grace = free_port(), 5
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--max-model-len", "4096",
                             "--enforce-eager",
                             "--max-num-seqs", "4", "--shutdown-grace-seconds", str(grace), "--log-level", "warning"],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def server_log() -> str:
        log.seek(0)
        return log.read()

    try:
        statuses, deadline = [], time.monotonic() + 120
        while not statuses or statuses[-1] != 200:
            assert proc.poll() is None, f"the server exited early:\n{server_log()}"
            assert time.monotonic() < deadline, f"never ready: {statuses}\n{server_log()}"
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
            except httpx.ConnectError:
                assert not statuses, "the port stopped answering after it was up"
            time.sleep(0.05)
        assert set(statuses) <= {503, 200} and 503 in statuses, statuses

        body = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "logprobs": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        endless = {**body, "max_tokens": 4000}  # far longer than the grace period allows
        endless_lines: list[str] = []
        endless_started = threading.Event()

        def read_endless():
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=endless, timeout=60) as r:
                    for line in r.iter_lines():
                        endless_lines.append(line)
                        endless_started.set()
            except httpx.HTTPError:  # cut off
                pass
            endless_started.set()

        reader = threading.Thread(target=read_endless)
        reader.start()
        assert endless_started.wait(timeout=30) and endless_lines[0].startswith("data: "), endless_lines[:1]
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while httpx.get(f"{url}/health", timeout=5).status_code != 503:  # draining, while the stream goes on
                assert time.monotonic() - signalled < 5, "still admitting requests after SIGTERM"
                time.sleep(0.02)
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=5)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "shutting_down"
            events = sse_events(r, lines)
        tokens = len(json.loads(first[len("data: "):])["choices"][0]["logprobs"]["tokens"])
        tokens += sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"])
        assert tokens == 48
        assert events[-1]["usage"]["completion_tokens"] == 48
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        assert proc.wait(timeout=grace + 10) == 0, server_log()
        # one grace period, not two: the process's own exit after it takes a second or so on an idle machine and
        # a few when the suite's other worker loads both cores
        assert grace <= time.monotonic() - signalled < 2 * grace
        reader.join(timeout=10)
        assert endless_lines and "data: [DONE]" not in endless_lines  # it had started, and was cut off
        with pytest.raises(httpx.ConnectError):  # gone
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_a_non_streaming_client_that_leaves_frees_its_slot_quietly(tiny_server, caplog):
    """The request is aborted within the disconnect check's interval, and the abort is not logged as an error."""
    with caplog.at_level("INFO"), pytest.raises(httpx.ReadTimeout), tiny_server.http(timeout=0.5) as http:
        http.post("/v1/completions", json={"model": tiny_server.model, "prompt": "Hi", "max_tokens": 4000,
                                           "ignore_eos": True})
    tiny_server.wait_until_idle(timeout=3.0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text[-2000:]
