"""What the bodies of several endpoints share: strict parsing, integers as JSON Schema counts them, token ids,
usage, logprobs, ids and timestamps."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from server.engine.sampling_params import MAX_LOGPROBS

__all__ = ["MAX_LOGPROBS"]


def _integral(value):
    """1.0 is an integer as JSON Schema counts (and as clients send it); 1.5 and "1" stay errors."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**constraints):  # noqa: N802 - a type
    """An integer request field within `constraints` (ge, le, ...); integral floats accepted (see `_integral`)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


# A token id: the OpenAPI document gets its upper bound, the model's vocabulary, once the model is loaded.
TokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-token-id": True}), BeforeValidator(_integral)]
TOKEN_ID_KEY = "0|[1-9][0-9]*"  # a token id as a JSON object key: decimal, no sign, no leading zeros
NonEmptyText = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk too (with include_usage)


def new_id(prefix: str) -> str:
    """A fresh id as OpenAI spells its kind: "chatcmpl-…", "cmpl-…", "resp_…", "msg_…"."""
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Choice(BaseModel):
    index: int


ChoiceT = TypeVar("ChoiceT", bound=Choice)


class Response(BaseModel, Generic[ChoiceT]):
    """A response or a stream's chunk: each endpoint names its `object` and its kind of choice."""
    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class WithoutNone(BaseModel):
    """Fields left None are left out, as OpenAI's stream leaves them out (the SDK merges deltas key by key)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}
