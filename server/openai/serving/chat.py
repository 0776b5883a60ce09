"""POST /v1/chat/completions: messages rendered with the model's chat template, an assistant reply out."""

from __future__ import annotations

from server.engine.exceptions import ParamError
from server.engine.output import RequestOutput, TokenLogprob
from server.openai import tool_calls
from server.openai.chat_prompt import ChatPrompt, template_messages
from server.openai.constraints import format_spec
from server.openai.protocol.chat import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                         ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                         ChatTokenLogprob, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                         FunctionCall, ToolCall, TopLogprob)
from server.openai.protocol.common import MAX_LOGPROBS
from server.openai.sampling import sampling_params
from server.openai.serving.base import ChunkWriter, Finished, Prepared, Serving
from server.openai.tool_calls import ToolCallScanner, parse_tool_calls


class ChatServing(Serving):
    id_prefix = "chatcmpl-"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt = ChatPrompt(self.tokenizer)

    def prepare(self, body: ChatCompletionRequest) -> Prepared:
        """Messages → template → prompt ids; tools and formats → a grammar; the fields → sampling parameters."""
        if body.tools is not None:  # checked first: the template renders them into the prompt
            tool_calls.check_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        elif body.tool_choice not in (None, "none", "auto"):
            raise ParamError("tool_choice needs tools", "tool_choice")
        turns = template_messages(body.messages)
        offered = body.tools if body.tools and body.tool_choice != "none" else None
        ids = self.prompt.ids(turns, body.add_generation_prompt, offered)
        self.check_prompt(ids, param="messages")

        spec, call_format = tool_calls.output_grammar(body.tools, body.tool_choice, body.parallel_tool_calls,
                                                      format_spec(body))
        if body.top_logprobs is not None and not body.logprobs:
            raise ParamError("top_logprobs requires logprobs to be true", "top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise ParamError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return Prepared([ids], sampling_params(body, max_tokens, logprobs), spec, call_format)

    def response(self, body: ChatCompletionRequest, prepared: Prepared, finished: Finished, request_id: str,
                 created: int) -> dict:
        out = []
        for i, c in sorted(finished.choices.items()):
            message, finish_reason = AssistantMessage(content=c.text), c.finish_reason
            if prepared.call_format is not None:
                content, calls = parse_tool_calls(c.text, prepared.call_format)
                message = AssistantMessage(content=content, tool_calls=[
                    ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                    for call in calls])
                if calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            out.append(ChatChoice(index=i, message=message,
                                  logprobs=self.logprobs(c.logprobs) if body.logprobs else None,
                                  finish_reason=finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=out,
                                      usage=finished.usage).model_dump()

    def writer(self, body: ChatCompletionRequest, prepared: Prepared, request_id: str, created: int) -> ChunkWriter:
        return ChatChunks(self, body, prepared, request_id, created)

    def _top(self, token_id: int, logprob: float) -> dict:
        return {"token": self.token_text(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.decode_bytes([token_id]))}

    def logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = [ChatTokenLogprob(**self._top(e.token_id, e.logprob),
                                    top_logprobs=[TopLogprob(**self._top(t, lp)) for t, lp in e.top])
                   for e in entries]
        return ChatLogprobs(content=content)


class ChatChunks(ChunkWriter):
    """A stream's chunks: each choice's first carries the role; tool calls arrive as a call's first delta (index,
    id, type, name) and then its argument fragments, which concatenate to the final `arguments` byte for byte."""

    chunk_type = ChatCompletionChunk

    def __init__(self, *args):
        super().__init__(*args)
        self.call_format = self.prepared.call_format
        self.started: set[int] = set()
        self.scanners: dict[int, ToolCallScanner] = {}

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[str]:
        chunks = []
        for d in out.deltas:
            if d.index not in self.started:
                self.started.add(d.index)
                chunks.append(self.chunk([ChatChunkChoice(index=d.index,
                                                           delta=DeltaMessage(role="assistant", content=""))]))
            logprobs = self.serving.logprobs(d.logprobs or []) if self.body.logprobs else None
            if self.call_format is None:
                if not d.text and not d.finish_reason and logprobs is None:
                    continue
                delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
                chunks.append(self.chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                                           finish_reason=d.finish_reason,
                                                           stop_reason=d.stop_reason)]))
                continue
            scanner = self.scanners.setdefault(d.index, ToolCallScanner(self.call_format))
            deltas = call_deltas(scanner.feed(d.text, final=d.finish_reason is not None))
            finish_reason = d.finish_reason
            if scanner.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            for delta in deltas[:-1]:
                chunks.append(self.chunk([ChatChunkChoice(index=d.index, delta=delta)]))
            last = deltas[-1] if deltas else DeltaMessage()
            if deltas or finish_reason or logprobs is not None:
                chunks.append(self.chunk([ChatChunkChoice(index=d.index, delta=last, logprobs=logprobs,
                                                           finish_reason=finish_reason, stop_reason=d.stop_reason)]))
        return chunks


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
