"""What every endpoint shares: one request skeleton (check the model, prepare, compile the grammar, run the prompts
through the engine, answer in full or as server-sent events), the merging of several prompts' streams, metrics
and the per-request log line. Each endpoint (completions.py, chat.py) says how a body is prepared, how a full
response is built from the finished choices, and what its stream's chunks are."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine.async_engine import AsyncEngine
from server.engine.exceptions import ParamError
from server.engine.grammar import GrammarCompiler, GrammarSpec
from server.engine.output import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.openai.errors import APIError, ClientDisconnected, to_api_error
from server.openai.metrics import Metrics
from server.openai.protocol.common import Response, Usage, new_id, now
from server.openai.sampling import request_timeout
from server.openai.tool_calls import ToolCallFormat

log = logging.getLogger("server.requests")
_DONE = object()


class GrammarCompilers:
    """One grammar compiler per server, built on first use (reading the vocabulary takes about a second)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._compiler: GrammarCompiler | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> GrammarCompiler:
        async with self._lock:
            if self._compiler is None:
                self._compiler = await asyncio.to_thread(GrammarCompiler, self.engine.tokenizer,
                                                         self.engine.vocab_size)
        return self._compiler


@dataclass
class Prepared:
    """A request made ready for the engine: its prompts' ids, its sampling parameters, the grammar its output
    must follow (compiled into `params.grammar` before it runs) and, for tool calls, how to read them back."""

    prompts: list[list[int]]
    params: SamplingParams
    spec: GrammarSpec | None = None
    call_format: ToolCallFormat | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class Choice:
    """One choice accumulated from deltas: what a non-streaming response returns."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Finished:
    """A non-streaming request's outcome: its choices by index and each prompt's prompt logprobs (when asked)."""

    choices: dict[int, Choice]
    prompt_logprobs: dict[int, list]
    usage: Usage
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventWriter:
    """One streamed request's server-sent events: what comes before any output, what an output becomes, what
    ends the stream, and what reports a failure once the headers are sent. It counts the tokens as they come."""

    def __init__(self, serving: Serving, body, prepared: Prepared, request_id: str, created: int):
        self.serving, self.body, self.prepared = serving, body, prepared
        self.request_id, self.created = request_id, created
        self.completion_tokens = 0

    @property
    def usage(self) -> Usage:
        return Usage.of(self.prepared.num_prompt_tokens, self.completion_tokens)

    def opening(self) -> list[str]:
        return []

    def events(self, prompt_index: int, out: RequestOutput) -> list[str]:
        raise NotImplementedError

    def closing(self) -> list[str]:
        raise NotImplementedError

    def failure(self, error: BaseException) -> list[str]:
        raise NotImplementedError


class ChunkWriter(EventWriter):
    """Completions and chat completions: every event is a chunk (a `chunk_type`, the endpoint's response or chunk
    model, with some of the choices); usage in a last chunk when asked (`stream_options.include_usage`), and on
    every chunk with vLLM's `continuous_usage_stats`; the stream ends with [DONE]."""

    chunk_type: type[Response]

    def __init__(self, *args):
        super().__init__(*args)
        options = self.body.stream_options
        self.with_usage = bool(options and options.include_usage)
        self.continuous_usage = self.with_usage and bool(options.continuous_usage_stats)

    def chunk(self, choices: list, usage: Usage | None = None) -> str:
        usage = self.usage if usage is None and self.continuous_usage else usage
        chunk = self.chunk_type(id=self.request_id, created=self.created, model=self.serving.model_name,
                                choices=choices, usage=usage)
        return sse(chunk.model_dump(exclude=set() if self.with_usage else {"usage"}))

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[str]:
        raise NotImplementedError

    def events(self, prompt_index: int, out: RequestOutput) -> list[str]:
        return self.chunks(prompt_index, out)

    def closing(self) -> list[str]:
        return ([self.chunk([], self.usage)] if self.with_usage else []) + [sse("[DONE]")]

    def failure(self, error: BaseException) -> list[str]:
        return [sse(to_api_error(error).body()), sse("[DONE]")]


class Serving:
    id_prefix: str

    def __init__(self, engine: AsyncEngine, served_model_name: str, metrics: Metrics, grammars: GrammarCompilers,
                 log_requests: bool = False):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name
        self.metrics = metrics
        self.grammars = grammars
        self.log_requests = log_requests  # log prompt and output text too (--log-requests); never by default

    # -- what each endpoint says ------------------------------------------------------------------------------

    def prepare(self, body) -> Prepared:
        raise NotImplementedError

    def response(self, body, prepared: Prepared, finished: Finished, request_id: str, created: int) -> dict:
        raise NotImplementedError

    def writer(self, body, prepared: Prepared, request_id: str, created: int) -> EventWriter:
        raise NotImplementedError

    # -- the skeleton -----------------------------------------------------------------------------------------

    async def create(self, body, raw: Request):
        self.check_model(body.model)
        prepared = self.prepare(body)
        prepared.params.timeout = request_timeout(raw)
        await self.constrain(prepared.params, prepared.spec)
        request_id, created = new_id(self.id_prefix), now()
        stream = self.run(prepared.prompts, prepared.params, request_id)
        if body.stream:
            stream = await self.first_then_rest(stream)
            events = self.events(self.writer(body, prepared, request_id, created), stream)
            return StreamingResponse(events, media_type="text/event-stream")
        finished = await self.collect(raw, stream, prepared)
        return JSONResponse(self.response(body, prepared, finished, request_id, created))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        """The engine's own prompt checks, before anything starts, naming the field the client sent."""
        try:
            self.engine.check_prompt(ids)
        except ParamError as e:
            error = to_api_error(e)
            error.param = param
            raise error from None

    async def constrain(self, params: SamplingParams, spec: GrammarSpec | None) -> None:
        """Compile the request's output constraint (off the event loop, cached) into `params.grammar`."""
        if spec is None:
            return
        if params.ignore_eos:
            raise ParamError("ignore_eos cannot be combined with an output constraint: the constraint ends the "
                             "output with a stop token", spec.param)
        params.grammar = await (await self.grammars.get()).compile_async(spec)
        params.grammar_param = spec.param

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def run(self, prompts: list[list[int]], params: SamplingParams,
                  request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All prompts' outputs as (prompt index, output), interleaved as they come; closing it aborts them all."""
        streams = [self.engine.generate(ids, params, f"{request_id}-{i}") for i, ids in enumerate(prompts)]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            except Exception as e:
                await queue.put((i, e))
            finally:
                await queue.put((i, _DONE))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        finished: set[int] = set()
        texts: dict[tuple[int, int], str] = {}  # (prompt, choice) -> text so far, kept only for --log-requests
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self.metrics.observe(item)
                    if self.log_requests:
                        for d in item.deltas:
                            texts[i, d.index] = texts.get((i, d.index), "") + d.text
                    if item.finished:
                        finished.add(i)
                        self._log(item, [t for (p, _), t in sorted(texts.items()) if p == i])
                    yield i, item
        finally:
            if len(finished) < len(prompts):  # the client left or an error ended the rest: count them as aborted
                self.metrics.observe_aborted((len(prompts) - len(finished)) * params.n)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, raw: Request, stream: AsyncIterator[tuple[int, RequestOutput]],
                      prepared: Prepared) -> Finished:
        """Drain the stream for a non-streaming response. A client that goes away aborts the requests."""
        n = prepared.params.n
        finished = Finished({}, {}, Usage.of(prepared.num_prompt_tokens, 0))

        async def drain():
            async for i, out in stream:
                for d in out.deltas:
                    c = finished.choices.setdefault(i * n + d.index, Choice())
                    c.text += d.text
                    c.token_ids += d.token_ids
                    c.logprobs += d.logprobs or []
                    if d.finish_reason:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                if out.prompt_logprobs is not None:
                    finished.prompt_logprobs.setdefault(i, out.prompt_logprobs)
                if out.finished and out.metrics is not None:
                    finished.cached_tokens += out.metrics.num_cached_tokens

        task = asyncio.create_task(drain())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected("client disconnected")
        task.result()
        finished.usage = Usage.of(prepared.num_prompt_tokens,
                                  sum(len(c.token_ids) for c in finished.choices.values()))
        return finished

    async def first_then_rest(self, stream: AsyncIterator) -> AsyncIterator:
        """Wait for the first output before answering, so refusals (overload, bad prompt) get a real status."""
        first = await anext(stream)

        async def chained():
            yield first
            async for item in stream:
                yield item
        return chained()

    async def events(self, writer: EventWriter, stream: AsyncIterator) -> AsyncIterator[str]:
        """The stream as the writer's server-sent events. An error once the headers are sent is reported in-band,
        as OpenAI-compatible servers do."""
        try:
            for event in writer.opening():
                yield event
            async for prompt_index, out in stream:
                writer.completion_tokens += sum(len(d.token_ids) for d in out.deltas)
                for event in writer.events(prompt_index, out):
                    yield event
            for event in writer.closing():
                yield event
        except Exception as e:
            for event in writer.failure(e):
                yield event

    def _log(self, out: RequestOutput, outputs: list[str]) -> None:
        """One line a request: ids, counts and timings; its text only with --log-requests."""
        m = out.metrics
        if m is None:
            return
        if self.log_requests:
            log.info("request %s text: prompt %r, outputs %r", out.request_id,
                     self.tokenizer.decode(out.prompt_token_ids), outputs)
        ttft = m.time_to_first_token
        speculation = ""
        if m.num_draft_tokens:  # speculative decoding: its acceptance, as vLLM reports it in aggregate
            speculation = (f", speculation accepted {m.num_accepted_tokens} of {m.num_draft_tokens} proposed tokens "
                           f"({m.num_accepted_tokens / m.num_draft_tokens:.0%})")
        log.info("request %s: prompt %d tokens, completion %d tokens, ttft %s, e2e %s%s",
                 out.request_id, m.num_prompt_tokens, m.num_generated_tokens,
                 "-" if ttft is None else f"{ttft:.3f}s", "-" if m.e2e_latency is None else f"{m.e2e_latency:.3f}s",
                 speculation)
