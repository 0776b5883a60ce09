"""Every refusal in OpenAI's error shape, with the right status and `param`; readiness, auth and overload."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from server.openai.app import ServerState, create_app
from server.openai.limits import Limits
from tests.server.conftest import (API_KEY, TINY_NAME, assert_openai_error, live_server, make_engine, run_uvicorn,
                                   server_state, sse_events)

MESSAGES = [{"role": "user", "content": "Hi"}]


def completion(server, **body) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/completions", json={"model": server.model, "max_tokens": 2, **body})


def chat(server, **body) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/chat/completions", json={"model": server.model, "max_tokens": 2, **body})


def test_malformed_json(tiny_server):
    with tiny_server.http() as http:
        for content in (b'{"prompt": "Hi", ', b"not json", b'{"prompt": "Hi"}}'):
            r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            error = assert_openai_error(r, 400, param=None, type="invalid_request_error")
            assert "JSON" in error["message"]
        for content in (b'["a", "list"]', b""):  # JSON, but not an object
            r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert_openai_error(r, 400, param=None)


@pytest.mark.parametrize("endpoint, field, value", [
    ("completions", "max_tokens", "ten"),
    ("completions", "max_tokens", 2.5),
    ("completions", "temperature", "hot"),
    ("completions", "n", True),
    ("completions", "stream", "yes"),
    ("completions", "prompt", 5),
    ("completions", "prompt", ["fine", 3]),
    ("completions", "stop", 3),
    ("completions", "logit_bias", ["not", "a", "map"]),
    ("chat", "messages", "Hi"),
    ("chat", "top_logprobs", "3"),
    ("chat", "stop", {"a": 1}),
])
def test_wrong_types_name_the_field(tiny_server, endpoint, field, value):
    body = {"prompt": "Hi"} if endpoint == "completions" else {"messages": MESSAGES}
    r = (completion if endpoint == "completions" else chat)(tiny_server, **{**body, field: value})
    error = assert_openai_error(r, 400, param=field, type="invalid_request_error")
    assert field in error["message"]


def test_nested_validation_errors_point_into_the_messages(tiny_server):
    r = chat(tiny_server, messages=[{"role": "wizard", "content": "Hi"}])
    assert_openai_error(r, 400, param="messages.0.role")
    r = chat(tiny_server, messages=[MESSAGES[0], {"role": "user", "content": [{"type": "image_url", "url": "x"}]}])
    assert_openai_error(r, 400, param="messages.1.content")  # text parts only
    r = chat(tiny_server, messages=[MESSAGES[0], {"role": "user", "content": [{"type": "text"}]}])
    assert_openai_error(r, 400, param="messages.1.content")
    assert_openai_error(chat(tiny_server, messages=[]), 400, param="messages")
    assert_openai_error(completion(tiny_server), 400, param="prompt")  # missing


@pytest.mark.parametrize("endpoint, field, value", [
    ("completions", "temperature", 5),
    ("completions", "temperature", -0.5),
    ("completions", "max_tokens", -1),
    ("completions", "max_tokens", 0),
    ("completions", "n", 0),
    ("completions", "logprobs", 50),
    ("completions", "top_p", 0),
    ("completions", "presence_penalty", 3),
    ("completions", "logit_bias", {"abc": 1}),
    ("completions", "logit_bias", {"999999999": 1}),
    ("completions", "stream_options", {"include_usage": True}),
    ("completions", "suffix", "and then"),
    ("chat", "temperature", 5),
    ("chat", "n", 0),
    ("chat", "max_tokens", -1),
    ("chat", "max_completion_tokens", -1),
    ("chat", "top_logprobs", 50),
    ("chat", "tools", "get_weather"),
    ("chat", "parallel_tool_calls", "yes"),
])
def test_out_of_range_values(tiny_server, endpoint, field, value):
    body = {"prompt": "Hi"} if endpoint == "completions" else {"messages": MESSAGES}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = (completion if endpoint == "completions" else chat)(tiny_server, **{**body, field: value})
    assert_openai_error(r, 400, param=field, type="invalid_request_error")


def test_refusals_come_before_a_stream_starts(tiny_server):
    with tiny_server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hi", "temperature": 5, "stream": True})
        assert_openai_error(r, 400, param="temperature")
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "model": "nope", "stream": True})
        assert_openai_error(r, 404, param="model", code="model_not_found")


def test_top_logprobs_needs_logprobs(tiny_server):
    assert_openai_error(chat(tiny_server, messages=MESSAGES, top_logprobs=2), 400, param="top_logprobs")


def test_sdk_raises_typed_errors(tiny_server):
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=tiny_server.model, prompt="Hi", temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_unknown_model(tiny_server):
    assert_openai_error(completion(tiny_server, prompt="Hi", model="gpt-4o"), 404, param="model",
                        code="model_not_found")
    assert_openai_error(chat(tiny_server, messages=MESSAGES, model="gpt-4o"), 404, param="model",
                        code="model_not_found")
    with tiny_server.http() as http:
        assert_openai_error(http.get("/v1/models/gpt-4o"), 404, param="model", code="model_not_found")
        assert_openai_error(http.post("/tokenize", json={"model": "gpt-4o", "prompt": "Hi"}), 404, param="model")


def test_unknown_route_and_method(tiny_server):
    with tiny_server.http() as http:
        assert_openai_error(http.get("/v1/nothing-here"), 404, type="not_found_error")
        assert_openai_error(http.post("/v1/engines/davinci/completions", json={}), 404)
        assert_openai_error(http.get("/v1/completions"), 405)


def test_empty_prompts(tiny_server, smol_server):
    for prompt in ([], [[]], [[1, 2], []]):
        assert_openai_error(completion(tiny_server, prompt=prompt), 400, param="prompt")
    # SmolLM2 adds no BOS, so an empty string is no tokens at all
    assert_openai_error(completion(smol_server, prompt=""), 400, param="prompt")
    assert_openai_error(completion(smol_server, prompt=["Hi", ""]), 400, param="prompt")


def test_prompt_token_ids_outside_the_vocabulary(tiny_server):
    for ids in ([128_256], [-1], [1, 2, 10**9]):
        assert_openai_error(completion(tiny_server, prompt=ids), 400, param="prompt")
    with tiny_server.http() as http:
        assert_openai_error(http.post("/detokenize", json={"tokens": [128_256]}), 400, param="tokens")


def test_prompt_too_long(tiny_server):
    max_len = tiny_server.engine.engine.max_model_len
    r = completion(tiny_server, prompt=[1000] * max_len)
    error = assert_openai_error(r, 400, param="prompt", code="context_length_exceeded")
    assert str(max_len) in error["message"]
    r = chat(tiny_server, messages=[{"role": "user", "content": " hello" * max_len}])
    assert_openai_error(r, 400, param="messages", code="context_length_exceeded")
    # one token of room left is enough: the completion is cut to fit
    r = completion(tiny_server, prompt=[1000] * (max_len - 1), max_tokens=5, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "length"


def test_huge_body(tiny_server):
    body = json.dumps({"model": tiny_server.model, "prompt": "x" * (Limits().body_bytes + 1)}).encode()
    with tiny_server.http() as http:
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 413)

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for i in range(0, len(body), 2**20):
                yield body[i:i + 2**20]

        r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert_openai_error(r, 413)
        small = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
        r = http.post("/v1/completions", content=iter([small[:5], small[5:]]),
                      headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text  # a small chunked body is fine


def test_json_schema_format_without_its_schema_is_refused(tiny_server):
    r = chat(tiny_server, messages=MESSAGES, response_format={"type": "json_schema"})
    error = assert_openai_error(r, 400, param="response_format")
    assert "json_schema" in error["message"]


def test_health_before_and_after_the_engine(tiny_llama3):
    state = server_state(TINY_NAME)
    with run_uvicorn(create_app(state)) as url, httpx.Client(base_url=url) as http:
        r = http.get("/health")
        assert_openai_error(r, 503, code="not_ready", type="server_error")
        assert r.headers["retry-after"]
        assert_openai_error(http.post("/v1/completions", json={"prompt": "Hi"}), 503, code="not_ready")
        assert http.get("/v1/models").json()["data"][0]["id"] == TINY_NAME

        state.set_engine(make_engine(tiny_llama3, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16))
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert not state.engine._thread.is_alive()  # the app's shutdown stopped the engine


def test_health_reports_a_failed_load():
    def load():
        raise FileNotFoundError("no such model: /nowhere.gguf")

    state = server_state(TINY_NAME)
    with run_uvicorn(create_app(state, load)) as url, httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 5
        while state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        error = assert_openai_error(http.get("/health"), 503, code="not_ready")
        assert "/nowhere.gguf" in error["message"]


def test_api_key(auth_server):
    with auth_server.http() as http:
        body = {"model": auth_server.model, "prompt": "Hi", "max_tokens": 1}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY},
                        {"authorization": f"Basic {API_KEY}"}):
            r = http.post("/v1/completions", json=body, headers=headers)
            assert_openai_error(r, 401, code="invalid_api_key", type="authentication_error")
        for path in ("/v1/models", f"/v1/models/{auth_server.model}"):
            assert_openai_error(http.get(path), 401)
        assert_openai_error(http.post("/tokenize", json={"prompt": "Hi"}), 401)
        r = http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
        assert http.get("/health").status_code == 200  # probes carry no key
        for path in ("/version", "/metrics"):  # every other route needs one (see --metrics-public)
            assert_openai_error(http.get(path), 401, code="invalid_api_key")
            assert http.get(path, headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200

    with pytest.raises(openai.AuthenticationError) as e:
        auth_server.client(api_key="wrong").models.list()
    assert e.value.status_code == 401
    assert [m.id for m in auth_server.client().models.list().data] == [auth_server.model]


def test_overload_answers_503_with_retry_after(tiny_llama3):
    """One slot and room for one waiting request: a third concurrent request is refused, streaming or not."""
    long = {"prompt": "Hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with live_server(tiny_llama3, TINY_NAME, max_model_len=4096, max_num_seqs=1, max_waiting=1,
                     max_num_batched_tokens=16) as server:
        stop = threading.Event()

        def hold():
            with server.http() as http, http.stream("POST", "/v1/completions", json=long) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

        def hold_until(running: int, waiting: int) -> threading.Thread:
            thread = threading.Thread(target=hold, daemon=True)
            thread.start()
            deadline = time.monotonic() + 10
            while (server.engine.stats().running, server.engine.stats().waiting) != (running, waiting):
                assert time.monotonic() < deadline, server.engine.stats()
                time.sleep(0.005)
            return thread

        holders = []
        try:
            holders.append(hold_until(running=1, waiting=0))
            holders.append(hold_until(running=1, waiting=1))
            with server.http() as http:
                for stream in (False, True):
                    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "stream": stream})
                    assert_openai_error(r, 503, code="overloaded", type="server_error")
                    assert int(r.headers["retry-after"]) >= 1
                r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
                assert_openai_error(r, 503, code="overloaded")
            with pytest.raises(openai.InternalServerError) as e:
                server.client().completions.create(model=server.model, prompt="Hi", max_tokens=1)
            assert e.value.status_code == 503
        finally:
            stop.set()
            for thread in holders:
                thread.join(10)
        server.wait_until_idle()
        with server.http() as http:
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200  # the refusals left nothing behind


def test_still_serving_after_the_errors(tiny_server):
    """Runs after the error cases above (pytest keeps file order): nothing they did broke the server."""
    assert tiny_server.slots_used() == 0
    r = completion(tiny_server, prompt="Still there?", max_tokens=4, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    with tiny_server.http() as http, http.stream("POST", "/v1/chat/completions",
                                                 json={"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True,
                                                       "stream": True}) as r:
        events = sse_events(r)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert tiny_server.slots_used() == 0


def test_several_keys_from_a_file_public_metrics_and_cors(tiny_llama3, tmp_path):
    from server.cli import resolve_settings

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    _, settings = resolve_settings(["--api-key-file", str(keys), "--metrics-public",
                                    "--allowed-origins", "https://app.example.com, https://admin.example.com"])
    assert settings.api_keys == ("sk-one", "sk-two") and settings.metrics_public
    assert settings.allowed_origins == ("https://app.example.com", "https://admin.example.com")
    with pytest.raises(SystemExit, match="no keys"):
        empty = tmp_path / "empty"
        empty.write_text("# nothing\n")
        resolve_settings(["--api-key-file", str(empty)])

    state = ServerState(replace(settings, served_model_name=TINY_NAME),
                        engine=make_engine(tiny_llama3, max_num_seqs=2, max_model_len=256))
    with run_uvicorn(create_app(state)) as url, httpx.Client(base_url=url) as http:
        body = {"model": TINY_NAME, "prompt": "Hi", "max_tokens": 1}
        for key in ("sk-one", "sk-two"):
            assert http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}).status_code \
                == 200
        assert_openai_error(http.post("/v1/completions", json=body, headers={"authorization": "Bearer sk-thr"}), 401)
        assert http.get("/metrics").status_code == 200  # public on request
        preflight = {"origin": "https://app.example.com", "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization,content-type"}
        allowed = http.options("/v1/completions", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        denied = http.options("/v1/completions", headers={**preflight, "origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in denied.headers
        simple = http.get("/health", headers={"origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in simple.headers


def test_no_cors_unless_origins_are_named_and_never_a_wildcard_with_credentials(tiny_llama3):
    for origins, credentials in (((), None), (("*",), None)):
        state = server_state(TINY_NAME, make_engine(tiny_llama3, max_num_seqs=2, max_model_len=256),
                             allowed_origins=origins)
        with run_uvicorn(create_app(state)) as url, httpx.Client(base_url=url) as http:
            r = http.options("/v1/completions", headers={"origin": "https://a.example.com",
                                                         "access-control-request-method": "POST"})
            if not origins:
                assert "access-control-allow-origin" not in r.headers
            else:
                assert r.headers["access-control-allow-origin"] == "*"
            assert r.headers.get("access-control-allow-credentials") == credentials


def test_operator_limits_are_400s_naming_the_field(tiny_llama3):
    from server.cli import resolve_settings
    _, settings = resolve_settings(["--limit", "n=2", "--limit", "stop=1", "--limit", "stop-length=5",
                                    "--limit", "logit_bias=1", "--limit", "prompts=2", "--limit", "messages=2",
                                    "--limit", "max_tokens=10", "--limit", "body_bytes=2000"])
    limits = settings.limits
    assert limits == Limits(body_bytes=2000, n=2, max_tokens=10, stop=1, stop_length=5, logit_bias=1, prompts=2,
                            messages=2)
    for bad in (["--limit", "speed=3"], ["--limit", "n=0"], ["--limit", "n=many"]):
        with pytest.raises(SystemExit):
            resolve_settings(bad)
    state = server_state(TINY_NAME, make_engine(tiny_llama3, max_num_seqs=2, max_model_len=256), limits=limits)
    user = [{"role": "user", "content": "Hi"}]
    cases = [("/v1/completions", {"prompt": "Hi", "n": 3}, "n"),
             ("/v1/completions", {"prompt": "Hi", "max_tokens": 11}, "max_tokens"),
             ("/v1/completions", {"prompt": "Hi", "stop": ["a", "b"]}, "stop"),
             ("/v1/completions", {"prompt": "Hi", "stop": "toolong"}, "stop"),
             ("/v1/completions", {"prompt": "Hi", "logit_bias": {"1": 1, "2": 1}}, "logit_bias"),
             ("/v1/completions", {"prompt": ["a", "b", "c"]}, "prompt"),
             ("/v1/chat/completions", {"messages": user * 3}, "messages"),
             ("/v1/chat/completions", {"messages": user, "max_completion_tokens": 11}, "max_completion_tokens")]
    with run_uvicorn(create_app(state)) as url, httpx.Client(base_url=url) as http:
        for path, body, param in cases:
            error = assert_openai_error(http.post(path, json={"model": TINY_NAME, "max_tokens": 2, **body}), 400,
                                        param=param)
            assert "limited to" in error["message"]
        ok = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": ["a", "b"], "n": 2, "max_tokens": 2,
                                                "stop": "x"})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
        assert_openai_error(http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "x" * 3000}), 413)
        # The OpenAPI document states the same limits.
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
        completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
        assert completion["n"]["maximum"] == 2 and chat["messages"]["maxItems"] == 2
        assert {b.get("maximum") for b in completion["max_tokens"]["anyOf"]} == {10, None}
        assert {b.get("maximum") for b in chat["max_completion_tokens"]["anyOf"]} == {10, None}
        assert {(b.get("maxItems"), b.get("maxLength")) for b in completion["stop"]["anyOf"]} == {
            (None, 5), (1, None), (None, None)}
        assert [b.get("maxProperties") for b in completion["logit_bias"]["anyOf"]] == [1, None]
        assert [b.get("maxItems") for b in completion["prompt"]["anyOf"]] == [None, 2, None, 2]


def test_request_logs_carry_text_only_with_log_requests(tiny_llama3, caplog):
    secret = "my secret prompt"
    for log_requests in (False, True):
        state = server_state(TINY_NAME, make_engine(tiny_llama3, max_num_seqs=2, max_model_len=256),
                             log_requests=log_requests)
        caplog.clear()
        with caplog.at_level("INFO", logger="server.requests"), run_uvicorn(create_app(state)) as url, \
                httpx.Client(base_url=url) as http:
            r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": secret, "max_tokens": 3})
            assert r.status_code == 200
            output = r.json()["choices"][0]["text"]
        logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.name == "server.requests")
        assert "completion 3 tokens" in logged
        assert (secret in logged) == log_requests and (repr(output) in logged) == log_requests, logged
