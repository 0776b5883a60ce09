"""POST /v1/responses: OpenAI's Responses API over the chat template, the grammar path and the stored conversations.

A request's input items (messages, earlier function calls and their outputs), after the stored conversation that
`previous_response_id` names, become chat turns rendered by the model's chat template; function tools and
`text.format` become one grammar, as in chat completions. The output is a message item, function_call items, or
both; streamed, it is OpenAI's sequence of typed events, each with its sequence number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.engine.exceptions import ParamError
from server.engine.output import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.openai import tool_calls
from server.openai.chat_prompt import ChatPrompt, template_tool_call
from server.openai.constraints import json_object_spec, json_schema_spec
from server.openai.errors import APIError, to_api_error
from server.openai.protocol.common import new_id
from server.openai.protocol.responses import (FunctionCallItem, FunctionCallOutputItem, MessageItem,
                                              ResponseObject, ResponsesRequest)
from server.openai.response_store import ResponseStore
from server.openai.serving.base import EventWriter, Finished, Prepared, Serving
from server.openai.tool_calls import ToolCallScanner, parse_tool_calls

LOGPROBS = "message.output_text.logprobs"


@dataclass
class PreparedResponse(Prepared):
    conversation: list[dict] = field(default_factory=list)  # stored input items: earlier turns, then this input


def input_items(body: ResponsesRequest) -> list[dict]:
    """The request's input as stored items, each with an id (as `GET /v1/responses/{id}/input_items` lists
    them)."""
    if isinstance(body.input, str):
        return [{"id": new_id("msg_"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": body.input}]}]
    items = []
    for item in body.input:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = ([{"type": kind, "text": item.content}] if isinstance(item.content, str)
                     else [{"type": part.type, "text": part.text} for part in item.content])
            items.append({"id": item.id or new_id("msg_"), "type": "message", "role": item.role,
                          "status": "completed", "content": parts})
        elif isinstance(item, FunctionCallItem):
            items.append({"id": item.id or new_id("fc_"), "type": "function_call", "call_id": item.call_id,
                          "name": item.name, "arguments": item.arguments, "status": "completed"})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else [p.model_dump() for p in item.output]
            items.append({"id": item.id or new_id("fco_"), "type": "function_call_output", "call_id": item.call_id,
                          "output": output, "status": "completed"})
    return items


def chat_turns(items: list[dict], instructions: str | None) -> list[dict[str, Any]]:
    """Stored items as chat-template turns: messages as they are (developer read as system), a run of function
    calls as one assistant turn with tool_calls (joined to the assistant message just before), their outputs as
    tool messages."""
    turns: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            text = "\n".join(part["text"] for part in item["content"])
            turns.append({"role": "system" if item["role"] == "developer" else item["role"], "content": text})
        elif item["type"] == "function_call":
            call = template_tool_call(item["call_id"], item["name"], item["arguments"])
            if turns and turns[-1]["role"] == "assistant":
                turns[-1].setdefault("tool_calls", []).append(call)
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            output = item["output"]
            text = output if isinstance(output, str) else "\n".join(part["text"] for part in output)
            turns.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    return turns


def output_as_input(output: list[dict]) -> list[dict]:
    """A stored response's output items as they continue its conversation."""
    return [{**item, "status": "completed"} for item in output]


class ResponsesServing(Serving):
    id_prefix = "resp_"

    def __init__(self, *args, store: ResponseStore, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt = ChatPrompt(self.tokenizer)
        self.store = store

    def prepare(self, body: ResponsesRequest) -> PreparedResponse:
        """Stored conversation and input → chat turns → prompt ids; tools and text.format → a grammar; the
        fields → sampling parameters."""
        history = []
        if body.previous_response_id is not None:
            stored = self.store.get(body.previous_response_id)
            if stored is None:
                raise APIError(404, f"no stored response has the id {body.previous_response_id!r}",
                               param="previous_response_id", code="response_not_found")
            history = stored.input_items + output_as_input(stored.response["output"])
        conversation = history + input_items(body)

        tools = [{"type": "function", "function": t.model_dump(exclude={"type", "strict"}, exclude_none=True)}
                 for t in body.tools or []]
        choice = body.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.name}}
        try:
            if body.tools is not None:
                tool_calls.check_tools(tools, choice, body.parallel_tool_calls)
            elif choice not in (None, "none", "auto"):
                raise ParamError("tool_choice needs tools", "tool_choice")
        except ParamError as e:  # named as the Responses API spells its fields
            raise ParamError(str(e), (e.param or "").replace(".function.", ".")) from None
        offered = tools if tools and choice != "none" else None
        ids = self.prompt.ids(chat_turns(conversation, body.instructions), True, offered)
        kept = conversation
        while body.truncation == "auto" and len(ids) >= self.engine.max_model_len and len(kept) > 1:
            kept = kept[1:]  # OpenAI's "auto": the oldest items go first, until the rest fits the context
            ids = self.prompt.ids(chat_turns(kept, body.instructions), True, offered)
        self.check_prompt(ids, param="input")
        spec, call_format = tool_calls.output_grammar(tools, choice, body.parallel_tool_calls,
                                                      self.format_spec(body))

        logprobs = (body.top_logprobs or 0) if LOGPROBS in (body.include or ()) else None
        params = SamplingParams(max_tokens=body.max_output_tokens, logprobs=logprobs, seed=body.seed,
                                temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p)
        return PreparedResponse([ids], params, spec, call_format, conversation=conversation)

    @staticmethod
    def format_spec(body: ResponsesRequest):
        fmt = body.text.format if body.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json_object_spec("text.format")
        return json_schema_spec(fmt.schema_, "text.format.schema")

    # -- the response object --------------------------------------------------------------------------------------

    def response_object(self, body: ResponsesRequest, response_id: str, created: int, status: str,
                        output: list[dict], usage: dict | None, error: dict | None = None) -> dict:
        """The response, with the settings it ran with echoed as OpenAI echoes them."""
        text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {}
        text.setdefault("format", {"type": "text"})
        tool_choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        return ResponseObject(
            id=response_id, created_at=created, status=status, error=error,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens, model=self.model_name,
            output=output, parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id, store=body.store,
            temperature=1.0 if body.temperature is None else body.temperature, text=text,
            tool_choice=tool_choice or "auto", tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
            top_logprobs=body.top_logprobs, top_p=1.0 if body.top_p is None else body.top_p,
            truncation=body.truncation or "disabled", usage=usage, user=body.user, metadata=body.metadata or {},
        ).model_dump(mode="json")

    def usage(self, prepared: Prepared, output_tokens: int, cached_tokens: int) -> dict:
        input_tokens = prepared.num_prompt_tokens
        return {"input_tokens": input_tokens, "input_tokens_details": {
                    "cached_tokens": cached_tokens, "cache_write_tokens": input_tokens - cached_tokens},
                "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens}

    def logprobs(self, entries: list[TokenLogprob]) -> list[dict]:
        def top(token_id: int, logprob: float) -> dict:
            return {"token": self.token_text(token_id), "logprob": logprob,
                    "bytes": list(self.tokenizer.decode_bytes([token_id]))}

        return [{**top(e.token_id, e.logprob), "top_logprobs": [top(t, lp) for t, lp in e.top]} for e in entries]

    def finish(self, body: ResponsesRequest, prepared: PreparedResponse, response: dict) -> dict:
        """A finished response, kept when the request asks (`store`, the default)."""
        if body.store:
            self.store.put(response, prepared.conversation)
        return response

    def response(self, body: ResponsesRequest, prepared: PreparedResponse, finished: Finished, request_id: str,
                 created: int) -> dict:
        choice = finished.choices[0]
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        content, calls = choice.text, []
        if prepared.call_format is not None:
            content, calls = parse_tool_calls(choice.text, prepared.call_format)
        output = []
        if content is not None or not calls:
            logprobs = None
            if prepared.params.logprobs is not None:  # of the tokens, when they are all text (no tools offered)
                logprobs = self.logprobs(choice.logprobs) if prepared.call_format is None else []
            output.append(message_item(new_id("msg_"), status, content or "", logprobs))
        output += [call_item(new_id("fc_"), call, "completed") for call in calls]
        usage = self.usage(prepared, finished.usage.completion_tokens, finished.cached_tokens)
        return self.finish(body, prepared, self.response_object(body, request_id, created, status, output, usage))

    def writer(self, body: ResponsesRequest, prepared: PreparedResponse, request_id: str, created: int):
        return ResponseEvents(self, body, prepared, request_id, created)


def message_item(item_id: str, status: str, text: str, logprobs: list[dict] | None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def call_item(item_id: str, call, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def sse_event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ResponseEvents(EventWriter):
    """A streamed response as OpenAI's events: response.created and .in_progress; for each output item, its
    .output_item.added, its content part or argument deltas, its .done events and .output_item.done; then
    response.completed (or .incomplete, or .failed once the stream has started). No [DONE] ends it."""

    def __init__(self, serving: ResponsesServing, body: ResponsesRequest, prepared: PreparedResponse,
                 request_id: str, created: int):
        super().__init__(serving, body, prepared, request_id, created)
        self.sequence = 0
        self.output: list[dict] = []     # finished items, then the open one last
        self.open: dict | None = None    # the item being written
        self.scanner = ToolCallScanner(prepared.call_format) if prepared.call_format is not None else None
        self.with_logprobs = prepared.params.logprobs is not None
        self.status = "in_progress"
        self.cached_tokens = 0

    def _event(self, kind: str, **fields) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(event)

    def _response(self, status: str, error: dict | None = None) -> dict:
        usage = None
        if status != "in_progress":
            usage = self.serving.usage(self.prepared, self.completion_tokens, self.cached_tokens)
        return self.serving.response_object(self.body, self.request_id, self.created, status, list(self.output),
                                            usage, error)

    def opening(self) -> list[str]:
        response = self._response("in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def events(self, prompt_index: int, out: RequestOutput) -> list[str]:
        events = []
        for d in out.deltas:
            logprobs = self.serving.logprobs(d.logprobs or []) if self.with_logprobs else []
            if self.scanner is None:
                pieces = [("content", d.text)] if d.text else []
            else:
                pieces = self.scanner.feed(d.text, final=d.finish_reason is not None)
            for kind, value in pieces:
                if kind == "content":
                    events += self._text(value, logprobs)
                    logprobs = []
                elif kind == "call":  # its arguments follow as their own events
                    item = {**call_item(new_id("fc_"), value[1], "in_progress"), "arguments": ""}
                    events += self._close() + self._open(item)
                else:
                    self.open["arguments"] += value[1]
                    events.append(self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                              output_index=len(self.output) - 1, delta=value[1]))
            if d.finish_reason is not None:
                self.status = "incomplete" if d.finish_reason == "length" else "completed"
                if not self.output:  # nothing was written: an empty message, as a full response has
                    events += self._text("", [])
                events += self._close()
        if out.finished and out.metrics is not None:
            self.cached_tokens = out.metrics.num_cached_tokens
        return events

    def _open(self, item: dict) -> list[str]:
        self.open = item
        self.output.append(item)
        shown = {**item, "content": []} if item["type"] == "message" else item
        events = [self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(shown))]
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=len(self.output) - 1, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def _text(self, text: str, logprobs: list[dict]) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self._close() + self._open(message_item(new_id("msg_"), "in_progress", "",
                                                              [] if self.with_logprobs else None))
        part = self.open["content"][0]
        part["text"] += text
        if self.with_logprobs and self.scanner is None:
            part["logprobs"] += logprobs
        if text:
            events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                      output_index=len(self.output) - 1, content_index=0, delta=text,
                                      logprobs=logprobs if self.scanner is None else []))
        return events

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.output) - 1
        item["status"] = "incomplete" if self.status == "incomplete" and item["type"] == "message" else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events = [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=part["text"], logprobs=part.get("logprobs") or []),
                      self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=dict(part))]
        else:
            events = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"])]
        return events + [self._event("response.output_item.done", output_index=index, item=dict(item))]

    def closing(self) -> list[str]:
        events = self._close()
        status = "incomplete" if self.status == "incomplete" else "completed"
        response = self.serving.finish(self.body, self.prepared, self._response(status))
        return events + [self._event(f"response.{status}", response=response)]

    def failure(self, error: BaseException) -> list[str]:
        body = to_api_error(error).body()["error"]
        self.open = None
        response = self._response("failed", {"code": body["code"] or "server_error", "message": body["message"]})
        return [self._event("response.failed", response=response)]
