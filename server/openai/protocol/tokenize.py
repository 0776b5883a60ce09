"""vLLM's POST /tokenize (a prompt or chat messages) and POST /detokenize."""

from __future__ import annotations

from pydantic import Field

from server.openai.protocol.common import Strict, TokenId
from server.openai.protocol.messages import ChatMessage


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
