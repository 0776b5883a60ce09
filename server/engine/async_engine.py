"""`AsyncEngine`: the engine loop on a thread of its own, an asyncio API in front of it.

Requests and aborts cross into the engine thread through a lock-protected inbox; outputs cross back to
each request's asyncio queue with `call_soon_threadsafe`. The HTTP event loop never runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from server.engine.exceptions import EngineDead
from server.engine.llm_engine import EngineStats, LLMEngine
from server.engine.output import RequestOutput
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size  # the output head's width: token ids must be below it
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple] = []  # ("add", request_id, prompt_ids, params, queue, loop) or ("abort", id)
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        self._stats = engine.stats()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (or being cancelled) aborts the request.

        Errors the engine raises on admission (bad parameters, prompt too long, overload) surface on the
        first iteration; an error while running the request is raised from the iteration that meets it.
        """
        if self._stopping or not self._thread.is_alive():
            raise EngineDead("the engine is not running")
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._submit(("add", request_id, list(prompt_ids), params, queue, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise item.error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """The engine's refusal of a prompt it cannot run (it reads only constants, so any thread may ask)."""
        self.engine.check_prompt(prompt_ids)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.engine.healthy

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _submit(self, item: tuple) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake.set()

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for item in items:
            if item[0] == "add":
                _, request_id, prompt_ids, params, queue, loop = item
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except Exception as e:  # refused: the caller sees the error, nothing was allocated
                    _deliver(queue, loop, e)
                    continue
                self._streams[request_id] = (queue, loop)
            else:
                self.engine.abort(item[1])
                self._streams.pop(item[1], None)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                self._stats = self.engine.stats()
                self.engine.idle()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in the engine itself: fail everyone rather than hang them
                log.exception("engine step failed")
                outputs = [self.engine.abort(rid) for rid in list(self._streams)]
                for out in outputs:
                    if out is not None:
                        out.error = e
                outputs = [o for o in outputs if o is not None]
            self._stats = self.engine.stats()
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                _deliver(*stream, out)
        # Shutting down: whoever still waits gets an error rather than silence.
        for queue, loop in self._streams.values():
            _deliver(queue, loop, EngineDead("the engine shut down"))
        self._streams.clear()
        self.engine.close()


def _deliver(queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop has closed; nobody is listening
        pass
