"""The request fields completions and chat completions share: OpenAI's sampling fields, the usual vLLM extensions,
and the output constraints (`response_format`, vLLM's `structured_outputs` and its older `guided_*` spelling)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from server.openai.protocol.common import TOKEN_ID_KEY, Int, NonEmptyText, StreamOptions, Strict, TokenId

Choices = Annotated[list[NonEmptyText], Field(min_length=1)]

# Rules between fields, in the schema too (JSON Schema `if`/`then`), so that clients and fuzzers see them.
STREAM_OPTIONS_NEED_STREAM = {"if": {"required": ["stream_options"], "properties": {"stream_options": {
    "type": "object"}}}, "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: one of json (a JSON schema), regex, choice, grammar (EBNF) or json_object."""
    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | NonEmptyText | None = Field(default=None, alias="json")
    regex: NonEmptyText | None = None
    choice: Choices | None = None
    grammar: NonEmptyText | None = None
    json_object: bool | None = None
    # vLLM's options for its own backends: accepted, nothing to do here.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


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
    guided_json: dict[str, Any] | NonEmptyText | None = None  # vLLM's older spelling of the same
    guided_regex: NonEmptyText | None = None
    guided_choice: Choices | None = None
    guided_grammar: NonEmptyText | None = None
