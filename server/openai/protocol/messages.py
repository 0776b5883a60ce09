"""Chat messages as requests carry them: one schema per role, told apart by `role`, so that what each role needs
is in the schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from server.openai.protocol.common import Strict


class ContentPart(Strict):
    type: Literal["text"]  # this model reads text only
    text: str


class _Message(Strict):
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]


class CalledFunction(Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # JSON text as OpenAI sends it (an object is taken too)


class ToolCall(Strict):
    """A call an earlier assistant turn made, as the response carried it."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantTurn(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None  # the calls it made


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[ContentPart]  # the tool's result
    tool_call_id: str                 # the call it answers


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
