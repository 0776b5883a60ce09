"""Chat messages as requests carry them: one schema per role, and their rendering for chat templates."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from server.protocol_base import Strict
from server.sampling_params import ParamError


class ContentPart(Strict):
    type: Literal["text"]  # this model reads text only
    text: str


class _Message(Strict):
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ParamError(f"content parts of type {part.type!r} are not supported: this model reads "
                                 "text only ('type': 'text' with a 'text' field)", "content")
        return "\n".join(part.text for part in self.content)


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


# One schema per role, told apart by `role`, so that what each role needs is in the schema.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: text content, `developer` read as `system`, the arguments of
    assistant tool calls parsed from their JSON strings to objects (as templates expect)."""
    out = []
    for i, m in enumerate(messages):
        try:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        except ParamError as e:
            raise ParamError(str(e), f"messages.{i}.content") from None
        if m.name:
            message["name"] = m.name
        if isinstance(m, ToolMessage):
            message["tool_call_id"] = m.tool_call_id
        if isinstance(m, AssistantTurn) and m.tool_calls is not None:
            message["tool_calls"] = [_template_tool_call(call) for call in m.tool_calls]
            if not m.content:
                message["content"] = None
        out.append(message)
    return out


def _template_tool_call(call: ToolCall) -> dict[str, Any]:
    """Arguments parsed from their JSON text to an object, as templates expect. Text that is not a JSON
    object (a model may have produced it) is passed on as it is: the history is the client's to give."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
