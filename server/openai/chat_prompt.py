"""A chat's prompt: messages as the checkpoint's chat template takes them, rendered, and tokenized.

One path for every endpoint that takes messages (chat completions, /tokenize), so that a conversation gives the
same prompt ids wherever it is sent. A template that knows nothing of tools (SmolLM2's) gets the tools described
in a system message, as Llama 3.1's JSON tool-calling prompt does, earlier calls written as the JSON the model is
asked to produce, and tool results as messages of role "tool".
"""

from __future__ import annotations

import json
from typing import Any

from model.text.chat_template import LLAMA3_CHAT_TEMPLATE, ChatTemplate
from model.text.tokenizer import Tokenizer
from server.openai.errors import APIError
from server.openai.protocol.messages import AssistantTurn, ChatMessage, ToolMessage
from server.openai.tool_calls import describe_tools


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: text content (text parts joined by newlines), `developer` read as
    `system`, the arguments of assistant tool calls parsed from their JSON strings to objects."""
    out = []
    for m in messages:
        text = m.content if not isinstance(m.content, list) else "\n".join(part.text for part in m.content)
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text or ""}
        if m.name:
            message["name"] = m.name
        if isinstance(m, ToolMessage):
            message["tool_call_id"] = m.tool_call_id
        if isinstance(m, AssistantTurn) and m.tool_calls is not None:
            message["tool_calls"] = [template_tool_call(call.id, call.function.name, call.function.arguments)
                                     for call in m.tool_calls]
            if not m.content:
                message["content"] = None
        out.append(message)
    return out


def template_tool_call(call_id: str | None, name: str, arguments: str | dict) -> dict[str, Any]:
    """An earlier call as templates take it: its arguments parsed from their JSON text to an object. Text that is
    not a JSON object (a model may have produced it) is passed on as it is: the history is the client's to give."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def without_tool_syntax(turns: list[dict], tools: list[dict] | None) -> list[dict]:
    """For a chat template that knows nothing of tools: the tools (if any) described in the system message, earlier
    calls written out as the JSON the model is asked to produce, tool results as plain messages of role "tool"."""
    out = [dict(m) for m in turns]
    if tools:
        described = describe_tools(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{described}" if out[0]["content"] else described
        else:
            out.insert(0, {"role": "system", "content": described})
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]},
                                        ensure_ascii=False) for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        m.pop("tool_call_id", None)
    return out


class ChatPrompt:
    """The checkpoint's chat template (Llama 3's when it has none), compiled once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE)
        self.knows_tools = "tools" in self.template.source

    def ids(self, turns: list[dict[str, Any]], add_generation_prompt: bool = True,
            tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of `turns` (see `template_messages`), with `tools` offered to the model when given."""
        if not self.knows_tools:
            turns, tools = without_tool_syntax(turns, tools), None
        try:
            text = self.template.render(turns, bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
                                        add_generation_prompt=add_generation_prompt, tools=tools or None)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        # The template writes BOS itself where the model wants one; encode_prompt never adds a second.
        return self.tokenizer.encode_prompt(text)
