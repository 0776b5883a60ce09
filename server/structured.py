"""Structured outputs: JSON, JSON schemas, regular expressions, choices, EBNF grammars and tool calls, enforced
token by token by a grammar that xgrammar compiles against our own vocabulary.

A request's constraint becomes a `GrammarSpec` (a kind and its canonical text) when the request is parsed, and
the spec is compiled off the engine thread (`GrammarCompiler.compile_async`, bounded in time, cached). The engine
gives each sequence its own `xgrammar.GrammarMatcher`; the sampler fills a token bitmask for the constrained rows
and applies it to their logits before temperature, filtering and the draw; the sampled token is fed back to its
matcher once. Unconstrained rows are never touched.

Tool calls are written as Llama 3.1's JSON tool calls, `{"name": "...", "parameters": {...}}`: `tool_choice`
"auto" lets the model write text and start a call at any point (the call, once started, is constrained),
"required" and a named function allow calls only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from server.sampling_params import ParamError

log = logging.getLogger(__name__)

MAX_WHITESPACE = 16           # consecutive whitespace characters a JSON value may hold (no runaway whitespace)
COMPILE_TIMEOUT_SECONDS = 30  # a grammar that takes longer is refused
CALL_TRIGGER = '{"name": '    # how a Llama 3.1 JSON tool call starts


@dataclass(frozen=True)
class GrammarSpec:
    kind: str    # "json_schema", "regex", "grammar" (EBNF) or "structural_tag"
    text: str    # canonical text: compact JSON for schemas and tags (key order kept), else as given
    param: str   # the request field it came from, for errors


@dataclass(frozen=True)
class ToolCallFormat:
    """What a constrained tool-calling request expects back (see `parse_tool_calls`)."""

    names: tuple[str, ...]
    auto: bool         # text may surround the calls
    parallel: bool


def _canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order matters to a schema


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    if not isinstance(schema, (dict, bool)):
        raise ParamError("a JSON schema must be an object", param)
    _check_schema(schema, param)
    return GrammarSpec("json_schema", _canonical(schema), param)


def json_object_spec(param: str) -> GrammarSpec:
    return GrammarSpec("json_schema", _canonical({"type": "object"}), param)


def regex_spec(pattern: Any, param: str) -> GrammarSpec:
    if not isinstance(pattern, str) or not pattern:
        raise ParamError("a regex must be a non-empty string", param)
    return GrammarSpec("regex", pattern, param)


def choice_spec(choices: Any, param: str) -> GrammarSpec:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ParamError("choice must be a non-empty list of non-empty strings", param)
    return GrammarSpec("grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices),
                       param)


def ebnf_spec(grammar: Any, param: str) -> GrammarSpec:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ParamError("grammar must be a non-empty EBNF string", param)
    return GrammarSpec("grammar", grammar, param)


def _check_schema(schema: Any, param: str) -> None:
    """The schema is valid JSON Schema (checked with `jsonschema`'s metaschema when it is installed)."""
    try:
        import jsonschema
    except ImportError:  # the grammar compiler still refuses what it cannot read
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ParamError(f"invalid JSON schema: {e.message}" + (f" (at {where})" if where else ""), param) from None


def tool_spec(tools: list[dict], tool_choice: Any, parallel: bool) -> tuple[GrammarSpec, ToolCallFormat] | None:
    """The grammar of a tool-calling request, or None for tool_choice "none". `tools` are OpenAI tool
    definitions, already checked (see `check_tools`)."""
    if tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, dict):
        names = [tool_choice["function"]["name"]]
        parallel = False  # OpenAI calls the named function once
    tags = []
    for tool in tools:
        function = tool["function"]
        if function["name"] not in names:
            continue
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        tags.append({"type": "tag", "begin": f'{CALL_TRIGGER}{json.dumps(function["name"], ensure_ascii=False)}, '
                     '"parameters": ', "content": {"type": "json_schema", "json_schema": schema,
                                                   "max_whitespace_cnt": MAX_WHITESPACE}, "end": "}"})
    auto = tool_choice in (None, "auto")
    if auto:
        fmt = {"type": "triggered_tags", "triggers": [CALL_TRIGGER], "tags": tags, "at_least_one": False,
               "stop_after_first": not parallel}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": not parallel}
    spec = GrammarSpec("structural_tag", _canonical({"type": "structural_tag", "format": fmt}), "tools")
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
            _check_schema(parameters, f"{where}.function.parameters")
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


def token_bytes(tokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Each token id's bytes as the grammar engine must see them, and the stop tokens. Special and added tokens
    (other than stop tokens) are given no bytes, which xgrammar treats as never allowed in constrained text; so
    are ids past the tokenizer's vocabulary (the output head may be wider)."""
    stops = sorted(tokenizer.eos_token_ids)
    added = set(tokenizer._token_of_added_id) | set(tokenizer.special_token_ids)
    vocab = []
    for i in range(vocab_size):
        if i in added or i in tokenizer.eos_token_ids or not tokenizer._is_token_id(i):
            vocab.append(b"")
        else:
            vocab.append(tokenizer.decode_bytes([i]))
    return vocab, stops


class GrammarCompiler:
    """xgrammar's compiler for one vocabulary, with a cache of compiled grammars keyed on the canonical spec."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 128):
        import xgrammar as xgr

        self.xgr = xgr
        vocab, stops = token_bytes(tokenizer, vocab_size)
        self.tokenizer_info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                                stop_token_ids=stops)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec):
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        c = self._compiler
        try:
            if spec.kind == "json_schema":
                return c.compile_json_schema(spec.text, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
            if spec.kind == "regex":
                return c.compile_regex(spec.text)
            if spec.kind == "grammar":
                return c.compile_grammar(spec.text)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(spec.text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors name the offending construct
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ParamError(f"cannot enforce this {spec.kind.replace('_', ' ')}: {message}", spec.param) from None
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    async def compile_async(self, spec: GrammarSpec, timeout: float = COMPILE_TIMEOUT_SECONDS):
        """Compile on a worker thread (the event loop and the engine keep going), within `timeout` seconds."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.compile, spec), timeout)
        except asyncio.TimeoutError:
            raise ParamError(f"the {spec.kind.replace('_', ' ')} took longer than {timeout:.0f} s to compile",
                             spec.param) from None

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)


class MaskFiller:
    """Fills and applies token bitmasks for the constrained rows of a batch of logits."""

    def __init__(self, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits, matchers: list) -> None:
        """`matchers[i]` constrains row i of `logits` [B, V] (None: unconstrained); masks in place."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        if self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = self.xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(self._bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, self._bitmask[:logits.shape[0]].to(logits.device),
                                             vocab_size=self.vocab_size, indices=rows)


# -- tool calls in the output ------------------------------------------------------------------------------------

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
    state: str = "text"          # text, header, arguments, close
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, Any]]:
        """New text; returns events: ("content", text), ("call", (call index, ToolCall)) when a call starts (no
        arguments yet), ("arguments", (call index, fragment))."""
        self.text += delta
        events: list[tuple[str, Any]] = []
        while self.pos < len(self.text):
            if self.state == "text":
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
                header = _call_header(self.text, self.pos)
                if header is None:
                    break
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


@functools.lru_cache(maxsize=1)
def tools_prompt_preamble() -> str:
    return ("You have access to the following functions. To call a function, respond with a JSON object of the "
            'form {"name": function name, "parameters": dictionary of argument name and its value}. '
            "Do not use variables.\n\n")


def describe_tools(tools: list[dict]) -> str:
    """Tools described in a system message, the way Llama 3.1's JSON tool-calling prompt does, for chat
    templates that know nothing of tools."""
    return tools_prompt_preamble() + "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
