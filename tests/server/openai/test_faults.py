"""Fault injection through the engine's test-only hook: a step that raises fails only the requests in it (a 500
in OpenAI's shape, or a final error event while streaming), the next request is served, and an engine whose
steps keep failing turns /health to 503 so that an orchestrator restarts it."""

from __future__ import annotations

import json
import threading

from server.engine.llm_engine import UNHEALTHY_AFTER_FAILURES
from tests.server.conftest import TINY_NAME, assert_openai_error, live_server


def poison(marker: str):
    """A fault for every step that holds a request whose id contains `marker`."""
    def inject(batch):
        if any(marker in chunk.seq.request_id for chunk in batch.chunks):
            raise RuntimeError("injected fault")
    return inject


def test_a_failing_step_gives_an_openai_error_and_the_next_request_is_served(tiny_llama3):
    with live_server(tiny_llama3, TINY_NAME, max_model_len=1024, max_num_seqs=4) as server:
        engine = server.engine.engine
        with server.http() as http:
            engine.fault_injector = poison("cmpl-")
            r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "max_tokens": 5})
            error = assert_openai_error(r, 500, code="internal_error", type="server_error")
            assert "injected fault" in error["message"]
            engine.fault_injector = None
            ok = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "max_tokens": 5})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5

            with http.stream("POST", "/v1/chat/completions", json={
                    "model": TINY_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50,
                    "ignore_eos": True, "stream": True}) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert "choices" in json.loads(first[6:])
                engine.fault_injector = poison("chatcmpl-")  # fails a later step of this stream
                data = [line[6:] for line in lines if line.startswith("data: ")]
            engine.fault_injector = None
            assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error"
            server.wait_until_idle()
            assert http.get("/health").status_code == 200


def test_only_the_requests_in_the_failing_step_fail(tiny_llama3):
    """One KV slot: a long completion runs alone while a chat request waits; the fault hits only steps holding
    the chat request, which come after the completion is done. The completion is unharmed."""
    with live_server(tiny_llama3, TINY_NAME, max_model_len=1024, max_num_seqs=1) as server:
        engine = server.engine.engine
        engine.fault_injector = poison("chatcmpl-")
        results = {}
        with server.http() as http:
            def long_request():
                results["long"] = http.post("/v1/completions", json={
                    "model": TINY_NAME, "prompt": "Hi", "max_tokens": 300, "ignore_eos": True})

            thread = threading.Thread(target=long_request)
            thread.start()
            while engine.stats().running == 0 and thread.is_alive():
                pass
            chat = http.post("/v1/chat/completions", json={"model": TINY_NAME, "max_tokens": 5,
                                                           "messages": [{"role": "user", "content": "Hi"}]})
            thread.join(60)
            assert_openai_error(chat, 500, type="server_error")
            assert results["long"].status_code == 200
            assert results["long"].json()["usage"]["completion_tokens"] == 300
            assert http.get("/health").status_code == 200
            server.wait_until_idle()


def test_an_engine_that_keeps_failing_turns_health_503(tiny_llama3):
    with live_server(tiny_llama3, TINY_NAME, max_model_len=256, max_num_seqs=2) as server:
        engine = server.engine.engine
        with server.http() as http:
            engine.fault_injector = poison("")  # every step fails
            for _ in range(UNHEALTHY_AFTER_FAILURES):
                r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "max_tokens": 2})
                assert_openai_error(r, 500)
            assert_openai_error(http.get("/health"), 503, code="engine_unhealthy")
            engine.fault_injector = None  # the fault clears: the next step succeeds and health returns
            ok = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200
            assert http.get("/health").status_code == 200
            server.wait_until_idle()
