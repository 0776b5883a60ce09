"""Grammars: a request's output constraint (JSON schema, regex, EBNF, structural tags) as a `GrammarSpec`,
compiled by xgrammar against our own vocabulary.

The HTTP layer turns a request's fields into a spec (server/openai/constraints.py, tool_calls.py), and the spec
is compiled off the engine thread (`GrammarCompiler.compile_async`, bounded in time, cached). The engine gives
each sequence its own matcher (`matcher`); the worker fills a token bitmask for the constrained rows and applies
it to their logits before temperature, filtering and the draw (server/worker/grammar_masks.py); the sampled token
is fed back to its matcher once. Unconstrained rows are never touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from server.engine.exceptions import ParamError

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


def matcher(compiled):
    """A sequence's own matcher of a compiled grammar: where it is, which tokens may come next."""
    return xgr.GrammarMatcher(compiled)
