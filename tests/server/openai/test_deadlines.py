"""Request deadlines: the server's --request-timeout and a request's X-Request-Timeout header cover queue, prefill
and decode; a late request ends with an OpenAI-shaped 408 (a final error event while streaming), and its KV
cache slot is free at once."""

from __future__ import annotations

import json
import time

from tests.server.conftest import assert_openai_error, live_server

LONG = {"prompt": "Tell me everything.", "max_tokens": 4000, "ignore_eos": True}


def test_a_request_past_its_deadline_gets_a_408_and_frees_its_slot(tiny_server):
    with tiny_server.http() as http:
        start = time.monotonic()
        r = http.post("/v1/completions", json={"model": tiny_server.model, **LONG},
                      headers={"X-Request-Timeout": "0.3"})
        elapsed = time.monotonic() - start
        error = assert_openai_error(r, 408, code="request_timeout", type="timeout_error")
        assert "deadline" in error["message"]
        assert elapsed < 3.0, elapsed  # ended near its deadline, not after 4,000 tokens
        tiny_server.wait_until_idle(timeout=0.5)
        ok = http.post("/v1/completions", json={"model": tiny_server.model, "prompt": "Hi", "max_tokens": 3},
                       headers={"X-Request-Timeout": "30"})
        assert ok.status_code == 200, ok.text


def test_a_streamed_request_ends_with_an_error_event(tiny_server):
    with tiny_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", headers={"X-Request-Timeout": "0.3"}, json={
                "model": tiny_server.model, "messages": [{"role": "user", "content": "Go on."}], "stream": True,
                "max_tokens": 4000, "ignore_eos": True}) as r:
            assert r.status_code == 200
            data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["error"]["code"] == "request_timeout" and last["error"]["type"] == "timeout_error"
    assert any("choices" in json.loads(d) for d in data[:-2])  # tokens streamed before the deadline
    tiny_server.wait_until_idle(timeout=0.5)


def test_bad_timeout_headers_are_400s(tiny_server):
    with tiny_server.http() as http:
        for value in ("soon", "0", "-1", "1e9"):
            r = http.post("/v1/completions", json={"model": tiny_server.model, "prompt": "Hi", "max_tokens": 2},
                          headers={"X-Request-Timeout": value})
            assert_openai_error(r, 400, param="X-Request-Timeout")


def test_the_server_default_applies_and_a_header_overrides_it(tiny_llama3):
    with live_server(tiny_llama3, "tiny", max_model_len=4096, max_num_seqs=4, request_timeout=0.3) as server:
        with server.http() as http:
            late = http.post("/v1/completions", json={"model": "tiny", **LONG})
            assert_openai_error(late, 408, code="request_timeout")
            server.wait_until_idle(timeout=0.5)
            start = time.monotonic()
            longer = http.post("/v1/completions", json={"model": "tiny", **LONG, "max_tokens": 400},
                               headers={"X-Request-Timeout": "60"})
            assert longer.status_code == 200 and longer.json()["usage"]["completion_tokens"] == 400
            assert time.monotonic() - start > 0.3  # it did outlive the server's default
