"""POST /v1/chat/completions: messages rendered with the model's chat template, an assistant reply out."""

from __future__ import annotations

import json
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
                             DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall, TopLogprob,
                             Usage, new_id, now)
from server.serving import Serving, sse
from server.tool_calls import ToolCallFormat, ToolCallScanner, describe_tools, parse_tool_calls


class ChatServing(Serving):
    def __init__(self, engine: AsyncEngine, served_model_name: str, metrics: Metrics, grammars=None):
        super().__init__(engine, served_model_name, metrics, grammars)
        self.template = ChatTemplate(self.tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE)
        self.template_knows_tools = "tools" in self.template.source

    def prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                   tools: list[dict] | None = None) -> list[int]:
        if tools and not self.template_knows_tools:  # described in a system message instead, and calls as text
            messages = without_tool_syntax(messages, tools)
            tools = None
        try:
            text = self.template.render(messages, bos_token=self.tokenizer.bos_token,
                                        eos_token=self.tokenizer.eos_token,
                                        add_generation_prompt=add_generation_prompt, tools=tools or None)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        # The template writes BOS itself where the model wants one; encode_prompt never adds a second.
        return self.tokenizer.encode_prompt(text)

    async def create(self, body: ChatCompletionRequest, raw: Request):
        self.check_model(body.model)
        params = body.to_sampling_params()
        self.request_timeout(params, raw)
        tools = body.tool_grammar()
        spec, call_format = tools if tools is not None else (body.grammar_spec(), None)
        rendered_tools = body.tools if body.tools and body.tool_choice != "none" else None
        ids = self.prompt_ids(body.template_messages(), body.add_generation_prompt, rendered_tools)
        self.check_prompt(ids, param="messages")
        await self.constrain(params, spec)
        request_id, created = new_id("chatcmpl"), now()
        stream = self.run([ids], params, request_id)
        if body.stream:
            stream = await self.first_then_rest(stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(body, len(ids), stream, request_id, created, include_usage,
                                                  call_format), media_type="text/event-stream")
        choices, _ = await self.collect(raw, stream, params.n)
        out = []
        for i, c in sorted(choices.items()):
            message, finish_reason = AssistantMessage(content=c.text), c.finish_reason
            if call_format is not None:
                content, calls = parse_tool_calls(c.text, call_format)
                message = AssistantMessage(content=content, tool_calls=[
                    ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                    for call in calls])
                if calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            out.append(ChatChoice(index=i, message=message,
                                  logprobs=self._logprobs(c.logprobs) if body.logprobs else None,
                                  finish_reason=finish_reason, stop_reason=c.stop_reason))
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
                      created: int, include_usage: bool,
                      call_format: ToolCallFormat | None = None) -> AsyncIterator[str]:
        def chunk(choices, usage=None) -> str:
            c = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices,
                                    usage=usage)
            return sse(c.model_dump(exclude=set() if include_usage else {"usage"}))

        started: set[int] = set()
        scanners: dict[int, ToolCallScanner] = {}
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
                    if call_format is not None:
                        scanner = scanners.setdefault(d.index, ToolCallScanner(call_format))
                        deltas = call_deltas(scanner.feed(d.text, final=d.finish_reason is not None))
                        finish_reason = d.finish_reason
                        if scanner.calls and finish_reason == "stop":
                            finish_reason = "tool_calls"
                        for delta in deltas[:-1]:
                            yield chunk([ChatChunkChoice(index=d.index, delta=delta)])
                        last = deltas[-1] if deltas else DeltaMessage()
                        if deltas or finish_reason or logprobs is not None:
                            yield chunk([ChatChunkChoice(index=d.index, delta=last, logprobs=logprobs,
                                                         finish_reason=finish_reason, stop_reason=d.stop_reason)])
                        continue
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


def call_deltas(events) -> list[DeltaMessage]:
    """Scanner events as chat deltas: content, a call's first delta (index, id, type, name, empty arguments),
    then its argument fragments."""
    out = []
    for kind, value in events:
        if kind == "content":
            out.append(DeltaMessage(content=value))
        elif kind == "call":
            index, call = value
            out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=index, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments=""))]))
        else:
            index, fragment = value
            out.append(DeltaMessage(tool_calls=[DeltaToolCall(index=index,
                                                              function=DeltaFunctionCall(arguments=fragment))]))
    return out


def without_tool_syntax(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a chat template that knows nothing of tools: the tools described in the system message (as Llama
    3.1's JSON tool-calling prompt does), earlier calls written out as the JSON the model is asked to produce,
    and tool results as messages of role "tool"."""
    described = describe_tools(tools)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{described}" if out[0]["content"] else described
    else:
        out.insert(0, {"role": "system", "content": described})
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]},
                                        ensure_ascii=False) for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        m.pop("tool_call_id", None)
    return out
