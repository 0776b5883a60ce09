"""What both OpenAI endpoints share: model check, prompt checks, running prompts through the engine,
merging their streams, server-sent events, metrics and the per-request log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from server.async_engine import AsyncEngine
from server.errors import APIError, to_api_error
from server.metrics import Metrics
from server.output import RequestOutput, TokenLogprob
from server.sampling_params import ParamError, SamplingParams
from server.structured import GrammarCompiler, GrammarSpec

log = logging.getLogger("server.requests")
_DONE = object()


class ClientDisconnected(Exception):
    """A non-streaming client went away: its requests are aborted and nobody is left to answer."""


class GrammarCompilers:
    """One grammar compiler per server, built on first use (reading the vocabulary takes about a second)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self._compiler: GrammarCompiler | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> GrammarCompiler:
        async with self._lock:
            if self._compiler is None:
                vocab_size = self.engine.engine.model_config.vocab_size
                self._compiler = await asyncio.to_thread(GrammarCompiler, self.engine.tokenizer, vocab_size)
        return self._compiler


@dataclass
class Choice:
    """One choice accumulated from deltas: what a non-streaming response returns."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class Serving:
    def __init__(self, engine: AsyncEngine, served_model_name: str, metrics: Metrics,
                 grammars: GrammarCompilers | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = served_model_name
        self.metrics = metrics
        self.grammars = grammars or GrammarCompilers(engine)
        self.log_requests = False  # log prompt and output text too (--log-requests); never by default

    @staticmethod
    def request_timeout(params: SamplingParams, raw: Request) -> None:
        """A per-request deadline from the X-Request-Timeout header (seconds), over the server's default."""
        value = raw.headers.get("x-request-timeout")
        if value is None:
            return
        try:
            params.timeout = float(value)
        except ValueError:
            raise APIError(400, "the X-Request-Timeout header must be a number of seconds",
                           param="X-Request-Timeout") from None
        if not 0 < params.timeout <= 86400:
            raise APIError(400, "the X-Request-Timeout header must be between 0 and 86400 seconds",
                           param="X-Request-Timeout")

    async def constrain(self, params: SamplingParams, spec: GrammarSpec | None) -> None:
        """Compile the request's output constraint (off the event loop, cached) into `params.grammar`."""
        if spec is None:
            return
        if params.ignore_eos:
            raise ParamError("ignore_eos cannot be combined with an output constraint: the constraint ends the "
                             "output with a stop token", spec.param)
        params.grammar = await (await self.grammars.get()).compile_async(spec)
        params.grammar_param = spec.param

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        """The engine's own prompt checks, before anything starts, naming the field the client sent."""
        try:
            self.engine.engine.check_prompt(ids)
        except ParamError as e:
            error = to_api_error(e)
            error.param = param
            raise error from None

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
                      n: int) -> tuple[dict[int, Choice], dict[int, list]]:
        """Drain the stream for a non-streaming response: the choices by index, and each prompt's prompt
        logprobs when asked for. A client that goes away aborts the requests."""
        choices: dict[int, Choice] = {}
        prompt_logprobs: dict[int, list] = {}

        async def drain():
            async for i, out in stream:
                for d in out.deltas:
                    c = choices.setdefault(i * n + d.index, Choice())
                    c.text += d.text
                    c.token_ids += d.token_ids
                    c.logprobs += d.logprobs or []
                    if d.finish_reason:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                if out.prompt_logprobs is not None:
                    prompt_logprobs.setdefault(i, out.prompt_logprobs)

        task = asyncio.create_task(drain())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected("client disconnected")
        task.result()
        return choices, prompt_logprobs

    async def first_then_rest(self, stream: AsyncIterator) -> AsyncIterator:
        """Wait for the first output before answering, so refusals (overload, bad prompt) get a real status."""
        first = await anext(stream)

        async def chained():
            yield first
            async for item in stream:
                yield item
        return chained()

    @staticmethod
    def error_event(error: BaseException) -> str:
        return sse(to_api_error(error).body())

    def _log(self, out: RequestOutput, outputs: list[str]) -> None:
        """One line a request: ids, counts and timings; its text only with --log-requests."""
        m = out.metrics
        if m is None:
            return
        if self.log_requests:
            log.info("request %s text: prompt %r, outputs %r", out.request_id,
                     self.tokenizer.decode(out.prompt_token_ids), outputs)
        ttft = m.time_to_first_token
        log.info("request %s: prompt %d tokens, completion %d tokens, ttft %s, e2e %s",
                 out.request_id, m.num_prompt_tokens, m.num_generated_tokens,
                 "-" if ttft is None else f"{ttft:.3f}s", "-" if m.e2e_latency is None else f"{m.e2e_latency:.3f}s")
