"""POST /v1/completions: the request, the response, and a stream's chunks (responses of one choice each)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from server.openai.protocol.common import MAX_LOGPROBS, Choice, Int, NonEmptyText, Response, TokenId
from server.openai.protocol.sampling import SamplingFields

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


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(Response[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"
