"""Structured outputs: JSON, JSON schemas, regular expressions, choices, EBNF grammars and tool calls, enforced
token by token by a grammar that xgrammar compiles against our own vocabulary.

A request's constraint becomes a `GrammarSpec` (a kind and its canonical text) when the request is parsed, and
the spec is compiled off the engine thread (`GrammarCompiler.compile_async`, bounded in time, cached). The engine
gives each sequence its own `xgrammar.GrammarMatcher`; the sampler fills a token bitmask for the constrained rows
and applies it to their logits before temperature, filtering and the draw; the sampled token is fed back to its
matcher once. Unconstrained rows are never touched.

Tool calls (their grammar and how they are read back) are in server/tool_calls.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from model.batch import upload
from server.sampling_params import ParamError

log = logging.getLogger(__name__)

MAX_WHITESPACE = 16           # consecutive whitespace characters a JSON value may hold (no runaway whitespace)
COMPILE_TIMEOUT_SECONDS = 30  # a grammar that takes longer is refused


@dataclass(frozen=True)
class GrammarSpec:
    kind: str    # "json_schema", "regex", "grammar" (EBNF) or "structural_tag"
    text: str    # canonical text: compact JSON for schemas and tags (key order kept), else as given
    param: str   # the request field it came from, for errors


def canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order matters to a schema


def json_schema_spec(schema: Any, param: str) -> GrammarSpec:
    if not isinstance(schema, (dict, bool)):
        raise ParamError("a JSON schema must be an object", param)
    check_schema(schema, param)
    return GrammarSpec("json_schema", canonical(schema), param)


def json_object_spec(param: str) -> GrammarSpec:
    return GrammarSpec("json_schema", canonical({"type": "object"}), param)


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


def structured_outputs_specs(outputs: dict[str, Any]) -> list[GrammarSpec]:
    """vLLM's `structured_outputs` (json, regex, choice, grammar, json_object), one spec per constraint given."""
    makers = {"regex": regex_spec, "choice": choice_spec, "grammar": ebnf_spec}
    specs = []
    for key, value in outputs.items():
        param = f"structured_outputs.{key}"
        if value is None or key in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                                    "whitespace_pattern"):  # vLLM's options of its own backends: nothing to do
            continue
        if key == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ParamError(f"the JSON schema is not valid JSON: {e}", param) from None
            specs.append(json_schema_spec(value, param))
        elif key == "json_object":
            if value:
                specs.append(json_object_spec(param))
        elif key in makers:
            specs.append(makers[key](value, param))
        else:
            raise ParamError(f"unknown structured output {key!r}; use json, regex, choice or grammar", param)
    return specs


def check_schema(schema: Any, param: str) -> None:
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
        mask = upload(self._bitmask[:logits.shape[0]], logits.device)  # on CUDA: no wait for the step to finish
        self.xgr.apply_token_bitmask_inplace(logits, mask,
                                             vocab_size=self.vocab_size, indices=rows)
