"""POST /v1/chat/completions: messages rendered with the model's chat template, an assistant reply out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from model.chat_template import ChatTemplate, LLAMA3_CHAT_TEMPLATE
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import Metrics
from server.output import TokenLogprob
from server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                             ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob,
                             DeltaMessage, TopLogprob, Usage, new_id, now)
from server.serving import Serving, sse


class ChatServing(Serving):
    def __init__(self, engine: AsyncEngine, served_model_name: str, metrics: Metrics):
        super().__init__(engine, served_model_name, metrics)
        self.template = ChatTemplate(self.tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE)

    def prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            text = self.template.render(messages, bos_token=self.tokenizer.bos_token,
                                        eos_token=self.tokenizer.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        # The template writes BOS itself where the model wants one; encode_prompt never adds a second.
        return self.tokenizer.encode_prompt(text)

    async def create(self, body: ChatCompletionRequest, raw: Request):
        self.check_model(body.model)
        params = body.to_sampling_params()
        ids = self.prompt_ids(body.template_messages(), body.add_generation_prompt)
        self.check_prompt(ids, param="messages")
        request_id, created = new_id("chatcmpl"), now()
        stream = self.run([ids], params, request_id)
        if body.stream:
            stream = await self.first_then_rest(stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(body, len(ids), stream, request_id, created, include_usage),
                                     media_type="text/event-stream")
        choices, _ = await self.collect(raw, stream, params.n)
        out = [ChatChoice(index=i, message=AssistantMessage(content=c.text),
                          logprobs=self._logprobs(c.logprobs) if body.logprobs else None,
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for i, c in sorted(choices.items())]
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        usage = Usage(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                      total_tokens=len(ids) + completion_tokens)
        response = ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=out,
                                          usage=usage)
        return JSONResponse(response.model_dump())

    def _top(self, token_id: int, logprob: float) -> dict:
        return {"token": self.token_text(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.decode_bytes([token_id]))}

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = [ChatTokenLogprob(**self._top(e.token_id, e.logprob),
                                    top_logprobs=[TopLogprob(**self._top(t, lp)) for t, lp in e.top])
                   for e in entries]
        return ChatLogprobs(content=content)

    async def _events(self, body: ChatCompletionRequest, num_prompt: int, stream: AsyncIterator, request_id: str,
                      created: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            c = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                    usage=usage)
            return sse(c.model_dump(exclude=set() if include_usage else {"usage"}))

        started: set[int] = set()
        completion_tokens = 0
        try:
            async for _, out in stream:
                for d in out.deltas:
                    completion_tokens += len(d.token_ids)
                    if d.index not in started:  # the first chunk of each choice carries the role
                        started.add(d.index)
                        yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(role="assistant",
                                                                                       content=""))])
                    logprobs = self._logprobs(d.logprobs or []) if body.logprobs else None
                    if not d.text and not d.finish_reason and logprobs is None:
                        continue
                    delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
                    yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                                 finish_reason=d.finish_reason, stop_reason=d.stop_reason)])
            if include_usage:
                yield chunk([], Usage(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                                      total_tokens=num_prompt + completion_tokens))
        except Exception as e:  # headers are gone: report in-band
            yield self.error_event(e)
        yield sse("[DONE]")
