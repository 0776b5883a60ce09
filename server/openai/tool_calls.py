"""Tool calls: the grammar of a tool-calling request, and the calls read back out of the generated text.

Tool calls are written as Llama 3.1's JSON tool calls, `{"name": "...", "parameters": {...}}`: `tool_choice`
"auto" lets the model write text and start a call at any point (the call, once started, is constrained),
"required" and a named function allow calls only, and `parallel_tool_calls` false stops after the first call.
With an output format as well (a JSON schema, a regex, a grammar), "auto" allows either calls or content in that
format, and "none" the format alone: one grammar for both.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.engine.exceptions import ParamError
from server.engine.grammar import MAX_WHITESPACE, GrammarSpec, canonical
from server.openai.constraints import check_schema

CALL_TRIGGER = '{"name": '  # how a Llama 3.1 JSON tool call starts


@dataclass(frozen=True)
class ToolCallFormat:
    """What a constrained tool-calling request expects back (see `parse_tool_calls`)."""

    names: tuple[str, ...]
    auto: bool              # content may come instead of (or, without a format, around) the calls
    parallel: bool
    exclusive: bool = False  # calls or content in the output format: text that is not a call is all content


def output_grammar(tools: list[dict] | None, tool_choice: Any, parallel: bool,
                   fmt: GrammarSpec | None) -> tuple[GrammarSpec | None, ToolCallFormat | None]:
    """The one grammar of a request's output, from its tools (already checked, see `check_tools`), tool_choice,
    parallel_tool_calls and output format; and, when calls may come, how to read them back."""
    if not tools or tool_choice == "none":
        return fmt, None
    spec, calls = tool_spec(tools, tool_choice, parallel)
    if fmt is None or not calls.auto:
        return spec, calls
    either = {"type": "or", "elements": [tag_list(tools, calls.names, parallel), format_element(fmt)]}
    spec = GrammarSpec("structural_tag", canonical({"type": "structural_tag", "format": either}), fmt.param)
    return spec, ToolCallFormat(calls.names, True, parallel, exclusive=True)


def format_element(fmt: GrammarSpec) -> dict:
    """An output format as an element of a structural tag."""
    if fmt.kind == "json_schema":
        return {"type": "json_schema", "json_schema": json.loads(fmt.text), "max_whitespace_cnt": MAX_WHITESPACE}
    if fmt.kind == "regex":
        return {"type": "regex", "pattern": fmt.text}
    if fmt.kind == "grammar":
        return {"type": "grammar", "grammar": fmt.text}
    raise ValueError(f"a {fmt.kind} cannot be combined with tool calls")


def tag_list(tools: list[dict], names: tuple[str, ...], parallel: bool) -> dict:
    """One call or more (at most one unless parallel), one a line."""
    return {"type": "tags_with_separator", "tags": call_tags(tools, names), "separator": "\n", "at_least_one": True,
            "stop_after_first": not parallel}


def call_tags(tools: list[dict], names: tuple[str, ...]) -> list[dict]:
    tags = []
    for tool in tools:
        function = tool["function"]
        if function["name"] not in names:
            continue
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        tags.append({"type": "tag", "begin": f'{CALL_TRIGGER}{json.dumps(function["name"], ensure_ascii=False)}, '
                     '"parameters": ', "content": {"type": "json_schema", "json_schema": schema,
                                                   "max_whitespace_cnt": MAX_WHITESPACE}, "end": "}"})
    return tags


def tool_spec(tools: list[dict], tool_choice: Any, parallel: bool) -> tuple[GrammarSpec, ToolCallFormat]:
    """The grammar of the calls a request allows (tool_choice other than "none")."""
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, dict):
        names = [tool_choice["function"]["name"]]
        parallel = False  # OpenAI calls the named function once
    auto = tool_choice in (None, "auto")
    if auto:
        fmt = {"type": "triggered_tags", "triggers": [CALL_TRIGGER], "tags": call_tags(tools, tuple(names)),
               "at_least_one": False, "stop_after_first": not parallel}
    else:
        fmt = tag_list(tools, tuple(names), parallel)
    spec = GrammarSpec("structural_tag", canonical({"type": "structural_tag", "format": fmt}), "tools")
    return spec, ToolCallFormat(tuple(names), auto, parallel)


def check_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> None:
    """OpenAI's rules for `tools`, `tool_choice` and `parallel_tool_calls`, as 400s naming the field."""
    if not isinstance(tools, list):
        raise ParamError("tools must be a list of tool definitions", "tools")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ParamError("each tool must be {'type': 'function', 'function': {...}}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise ParamError("a function name must be 1 to 64 letters, digits, underscores or dashes",
                             f"{where}.function.name")
        if name in seen:
            raise ParamError(f"the function name {name!r} appears twice", f"{where}.function.name")
        seen.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise ParamError("a function description must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise ParamError("function parameters must be a JSON schema of type 'object'",
                                 f"{where}.function.parameters")
            check_schema(parameters, f"{where}.function.parameters")
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        pass
    elif isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(function, dict) or "name" not in function:
            raise ParamError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        if function["name"] not in seen:
            raise ParamError(f"tool_choice names the function {function['name']!r}, which is not in tools",
                             "tool_choice")
    else:
        raise ParamError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if tool_choice in ("required",) or isinstance(tool_choice, dict):
        if not tools:
            raise ParamError("tool_choice needs at least one tool", "tool_choice")
    if not isinstance(parallel_tool_calls, bool):
        raise ParamError("parallel_tool_calls must be a boolean", "parallel_tool_calls")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of the call's parameters, exactly as generated


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallScanner:
    """Splits generated text into content and tool calls as it streams in. A call is `{"name": "f",
    "parameters": {...}}`; its arguments are the parameters' JSON text exactly as generated, so the fragments
    streamed for a call concatenate to the final `arguments` string byte for byte."""

    fmt: ToolCallFormat
    text: str = ""
    pos: int = 0                 # text before pos is accounted for
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    state: str = "text"          # text, header, arguments, close; "content": the rest is all content
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, Any]]:
        """New text; returns events: ("content", text), ("call", (call index, ToolCall)) when a call starts (no
        arguments yet), ("arguments", (call index, fragment))."""
        self.text += delta
        events: list[tuple[str, Any]] = []
        while self.pos < len(self.text):
            if self.state == "content":
                self._content(events, self.text[self.pos:])
                self.pos = len(self.text)
            elif self.state == "text" and self.fmt.exclusive and not self.calls:
                # Calls or content, never both: the output is calls only if it starts with one.
                head = self.text[:len(CALL_TRIGGER)]
                if head == CALL_TRIGGER:
                    self.state = "header"
                elif CALL_TRIGGER.startswith(head) and not final:
                    break  # too short to tell yet
                else:
                    self.state = "content"
            elif self.state == "text":
                start = self.text.find(CALL_TRIGGER, self.pos)
                if start < 0:  # hold back what may be the start of a trigger, until more text comes
                    end = len(self.text) - (0 if final else _partial_suffix(self.text[self.pos:], CALL_TRIGGER))
                    if end > self.pos:
                        self._content(events, self.text[self.pos:end])
                        self.pos = end
                    break
                if start > self.pos:
                    self._content(events, self.text[self.pos:start])
                self.pos, self.state = start, "header"
            elif self.state == "header":
                try:
                    header = _call_header(self.text, self.pos)
                except ValueError:  # with an output format too, text that is not a call is content
                    if not self.fmt.exclusive:
                        raise
                    header = ("", -1)
                if header is None:
                    if final and self.fmt.exclusive:
                        self.state = "content"
                        continue
                    break
                if self.fmt.exclusive and header[0] not in self.fmt.names:
                    self.state = "content"
                    continue
                name, self.pos = header
                self.calls.append(ToolCall(new_call_id(), name, ""))
                events.append(("call", (len(self.calls) - 1, self.calls[-1])))
                self.state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
            elif self.state == "arguments":
                end = self._scan_arguments()
                stop = len(self.text) if end is None else end
                fragment = self.text[self.pos:stop]
                if fragment:
                    self.calls[-1].arguments += fragment
                    events.append(("arguments", (len(self.calls) - 1, fragment)))
                self.pos = stop
                if end is None:
                    break
                self.state = "close"
            else:  # the call object's closing brace
                closing = self.text.find("}", self.pos)
                if closing < 0:
                    self.pos = len(self.text)
                    break
                self.pos, self.state = closing + 1, "text"
        return events

    def _content(self, events, text: str) -> None:
        if self.calls and not text.strip():  # whitespace between calls is not content
            return
        self.content += text
        events.append(("content", text))

    def _scan_arguments(self) -> int | None:
        """Advance over the parameters' JSON from self.pos; the index just past the value, or None if it
        continues past the text so far."""
        for i in range(self.pos, len(self.text)):
            ch = self.text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _call_header(text: str, start: int) -> tuple[str, int] | None:
    """(function name, index where the parameters start) of a call header at `start`, or None if incomplete."""
    i = start + len(CALL_TRIGGER)
    try:
        name, end = json.JSONDecoder().raw_decode(text, i)
    except json.JSONDecodeError:
        return None
    rest = text[end:]
    marker = ', "parameters": '
    if len(rest) < len(marker):
        return None
    if not rest.startswith(marker) or not isinstance(name, str):
        raise ValueError("malformed tool call")
    return name, end + len(marker)


def parse_tool_calls(text: str, fmt: ToolCallFormat) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a finished output."""
    scanner = ToolCallScanner(fmt)
    scanner.feed(text, final=True)
    content = scanner.content
    if scanner.calls and not content.strip():
        content = None
    return content, scanner.calls


TOOLS_PREAMBLE = ("You have access to the following functions. To call a function, respond with a JSON object of the "
                  'form {"name": function name, "parameters": dictionary of argument name and its value}. '
                  "Do not use variables.\n\n")


def describe_tools(tools: list[dict]) -> str:
    """Tools described in a system message, the way Llama 3.1's JSON tool-calling prompt does, for chat
    templates that know nothing of tools."""
    return TOOLS_PREAMBLE + "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
