"""Request and response bodies of the OpenAI API, field by field, as pydantic models.

Requests are validated strictly (a string is not a number); fields this server does not know are ignored,
as OpenAI-compatible servers commonly do. Each request turns itself into `SamplingParams`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer
from pydantic.json_schema import SkipJsonSchema

from server import structured, tool_calls
from server.chat_messages import ChatMessage, template_messages
from server.protocol_base import Int, Strict, TokenId
from server.sampling_params import MAX_LOGPROBS, ParamError, SamplingParams
from server.structured import GrammarSpec
from server.tool_calls import ToolCallFormat


class StreamOptions(Strict):
    include_usage: bool = False


Choices = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: one of json (a JSON schema), regex, choice, grammar (EBNF) or json_object."""
    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options for its own backends: accepted, nothing to do here.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


TOKEN_ID_KEY = "0|[1-9][0-9]*"  # a token id as a JSON object key: decimal, no sign, no leading zeros

# Rules between fields, in the schema too (JSON Schema `if`/`then`), so that clients and fuzzers see them.
STREAM_OPTIONS_NEED_STREAM = {"if": {"required": ["stream_options"], "properties": {"stream_options": {
    "type": "object"}}}, "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
TOP_LOGPROBS_NEED_LOGPROBS = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {
    "type": "integer"}}}, "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


class SamplingFields(Strict):
    """What both endpoints share: OpenAI's sampling fields plus the usual vLLM extensions."""
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "allOf": [STREAM_OPTIONS_NEED_STREAM]})

    # The ranges SamplingParams enforces, stated in the schema too, so that clients and fuzzers see them.
    model: str | None = None
    max_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Int(ge=1, le=128) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    # Keys are token ids written as JSON object keys (strings of digits).
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(json_schema_extra={"propertyNames": {"pattern": f"^({TOKEN_ID_KEY})$",
                                                                     "x-token-id-key": True}})] | None = None
    seed: Int() | None = None  # any integer: samples are seeded with (seed + i) mod 2**64
    user: str | None = None
    # extensions
    top_k: Int(ge=-1) | None = None
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    min_tokens: Int(ge=0) = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    guided_json: dict[str, Any] | str | None = None      # vLLM's older spelling of the same
    guided_regex: str | None = None
    guided_choice: Choices | None = None
    guided_grammar: str | None = None

    def grammar_spec(self) -> GrammarSpec | None:
        """The output constraint this request asks for, if any; a 400 naming the field when it is invalid."""
        specs = []
        if self.response_format is not None and self.response_format.type != "text":
            specs.append(self.response_format.spec())
        outputs = self.structured_outputs.model_dump(exclude_none=True, by_alias=True) if self.structured_outputs else {}
        for old, new in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                         ("guided_grammar", "grammar")):
            if getattr(self, old) is not None:
                outputs[new] = getattr(self, old)
        specs += structured.structured_outputs_specs(outputs)
        if len(specs) > 1:
            raise ParamError("ask for one output constraint at a time (response_format or one structured output)",
                             specs[1].param)
        return specs[0] if specs else None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(TOKEN_ID_KEY, key):
                raise ParamError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            bias[int(key)] = value
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options is only allowed when stream is true", "stream_options")
        return SamplingParams(
            n=self.n, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=bias, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def spec(self) -> GrammarSpec:
        if self.type == "json_object":
            return structured.json_object_spec("response_format")
        if self.json_schema is None:
            raise ParamError("response_format of type 'json_schema' needs a 'json_schema' field", "response_format")
        schema = self.json_schema.schema_
        return structured.json_schema_spec({} if schema is None else schema, "response_format.json_schema.schema")


NonEmptyText = Annotated[str, Field(min_length=1)]
NonEmptyIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # Never empty: no tokens to start from (a checkpoint that adds BOS could take "", but nothing is gained).
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | NonEmptyIds | Annotated[
        list[NonEmptyIds], Field(min_length=1)]
    max_tokens: Int(ge=1) | None = 16
    logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool = False
    suffix: Annotated[str, Field(max_length=0)] | None = None  # insertion is not supported
    # Legacy in OpenAI's API and gone from vLLM's: only best_of equal to n is served, so the schema leaves it
    # out (no JSON Schema can say "equal to n"); a request that sends another value still gets a 400.
    best_of: SkipJsonSchema[Int() | None] = None

    def to_sampling_params(self) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of is not supported (only best_of equal to n)", "best_of")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={
        "allOf": [STREAM_OPTIONS_NEED_STREAM, TOP_LOGPROBS_NEED_LOGPROBS]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # extension: False continues the last assistant message
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def tool_grammar(self) -> tuple[GrammarSpec, ToolCallFormat] | None:
        """The grammar of the tool calls this request allows; None when it allows none."""
        if self.tools is None:
            if self.tool_choice not in (None, "none", "auto"):
                raise ParamError("tool_choice needs tools", "tool_choice")
            return None
        tool_calls.check_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        if not self.tools:
            return None
        tools = tool_calls.tool_spec(self.tools, self.tool_choice, self.parallel_tool_calls)
        if tools is not None and self.grammar_spec() is not None:
            raise ParamError("response_format or structured outputs cannot be combined with tool calls; "
                             "set tool_choice to 'none'", "tool_choice")
        return tools

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs requires logprobs to be true", "top_logprobs")
        # SamplingParams checks these too, but would name its own fields rather than the ones the client sent.
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ParamError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise ParamError("max_completion_tokens must be at least 1", "max_completion_tokens")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)


# -- responses ---------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class _WithoutNone(BaseModel):
    """Fields left None are left out, as OpenAI's stream leaves them out (the SDK merges deltas key by key)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNone):
    name: str | None = None
    arguments: str


class DeltaToolCall(_WithoutNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama3-server"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletion(Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChat(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True


TokenizeRequest = TokenizeCompletion | TokenizeChat  # vLLM's two forms: a prompt or chat messages


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]
