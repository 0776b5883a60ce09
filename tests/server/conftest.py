"""Live servers for the API tests: the real app under uvicorn on a loopback port, driven over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from model.loading import LoadedModel
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.openai.app import ServerState, create_app
from server.openai.config import ServerConfig

SMOLLM_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-llama3"
API_KEY = "sk-test-key"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    state: ServerState

    @property
    def engine(self) -> AsyncEngine:
        return self.state.engine

    @property
    def model(self) -> str:
        return self.state.config.served_model_name

    def client(self, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
        """The official SDK; no retries, so a 503 or a timeout is seen as it happened."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def async_client(self, api_key: str = API_KEY, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                                  timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def slots_used(self) -> int:
        return self.engine.stats().slots_used

    def wait_until_idle(self, timeout: float = 2.0) -> float:
        """Seconds until no KV cache slot is in use; fails the test after `timeout`."""
        start = time.monotonic()
        while self.slots_used() > 0:
            if time.monotonic() - start > timeout:
                pytest.fail(f"{self.slots_used()} KV cache slot(s) still in use after {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - start


def bound_socket() -> socket.socket:
    """A loopback socket already bound to a free port, so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with bound_socket() as sock:
        return sock.getsockname()[1]


@contextmanager
def run_uvicorn(app) -> Iterator[str]:
    """Serve `app` on a thread (uvicorn installs no signal handlers off the main thread); yield its URL."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def server_state(name: str, engine: AsyncEngine | None = None, **config) -> ServerState:
    """A server's state: `config` sets ServerConfig's fields, the served name is `name`."""
    return ServerState(ServerConfig(served_model_name=name, **config), engine=engine)


def make_engine(loaded: LoadedModel, **config) -> AsyncEngine:
    return AsyncEngine(LLMEngine(loaded, EngineConfig(enforce_eager=True, **config)))


@contextmanager
def live_server(loaded: LoadedModel, name: str, api_key: str | None = None, **config) -> Iterator[LiveServer]:
    """A server over its own engine; the app's shutdown stops the engine."""
    state = server_state(name, make_engine(loaded, **config), api_key=api_key)
    with run_uvicorn(create_app(state)) as url:
        yield LiveServer(url, state)


@pytest.fixture(scope="session")
def smol_server(smollm) -> Iterator[LiveServer]:
    """SmolLM2-135M-Instruct: where the text has to be real."""
    with live_server(smollm, SMOLLM_NAME, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_server(tiny_llama3) -> Iterator[LiveServer]:
    """The tiny random Llama 3: errors, concurrency, disconnects. Long context, so requests can run long."""
    with live_server(tiny_llama3, TINY_NAME, max_model_len=4096, max_num_seqs=32,
                     max_num_batched_tokens=512) as s:
        yield s


@pytest.fixture(scope="session")
def auth_server(tiny_llama3) -> Iterator[LiveServer]:
    with live_server(tiny_llama3, TINY_NAME, api_key=API_KEY, max_model_len=256, max_num_seqs=2,
                     max_num_batched_tokens=64) as s:
        yield s


def sse_events(response: httpx.Response, lines: Iterator[str] | None = None) -> list[dict]:
    """The JSON events of a server-sent event stream (or of the rest of its `lines`); checks the framing and
    the closing [DONE]."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = [], False
    for line in response.iter_lines() if lines is None else lines:
        if not line:
            continue
        assert not done, "an event after [DONE]"
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        assert "error" not in event, event
        events.append(event)
    assert done, "the stream did not end with [DONE]"
    return events


def scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, read with prometheus_client's own text parser."""
    with server.http() as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def metric(samples: dict, server: LiveServer, name: str, default: float | None = None, **labels) -> float:
    """One sample's value; a missing sample fails the test unless a default is given."""
    key = (f"llama3_server:{name}", tuple(sorted({"model_name": server.model, **labels}.items())))
    if key not in samples and default is None:
        pytest.fail(f"/metrics has no sample {key}")
    return samples.get(key, default)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None, type: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, and the given status."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if type is not None:
        assert error["type"] == type, error
    return error
