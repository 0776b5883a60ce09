"""POST /v1/chat/completions: the request, the response, and a stream's chunks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.openai.protocol.common import MAX_LOGPROBS, Choice, Int, Response, WithoutNone
from server.openai.protocol.messages import ChatMessage
from server.openai.protocol.sampling import STREAM_OPTIONS_NEED_STREAM, ResponseFormat, SamplingFields

TOP_LOGPROBS_NEED_LOGPROBS = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {
    "type": "integer"}}}, "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}
# A tool_choice other than "none" or "auto" names or requires a tool, so it needs tools (OpenAI answers 400 too).
TOOL_CHOICE_NEEDS_TOOLS = {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {
    "not": {"enum": ["none", "auto", None]}}}}, "then": {"required": ["tools"], "properties": {"tools": {
        "type": "array", "minItems": 1}}}}


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "allOf": [STREAM_OPTIONS_NEED_STREAM, TOP_LOGPROBS_NEED_LOGPROBS, TOOL_CHOICE_NEEDS_TOOLS]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # extension: False continues the last assistant message
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(Response[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"


class DeltaFunctionCall(WithoutNone):
    name: str | None = None
    arguments: str


class DeltaToolCall(WithoutNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(Response[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
