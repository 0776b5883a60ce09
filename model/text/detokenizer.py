"""Streaming detokenisation: text deltas that never split a UTF-8 character and add up to the full decode."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from numbers import Integral

from .tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Feed token ids as they are sampled; each call returns only the new text.

    Byte-level tokens can end inside a multi-byte character (an emoji spans several tokens), so the bytes of an
    incomplete character are held back until the rest arrives. Python's incremental UTF-8 decoder does exactly that
    and replaces invalid bytes with U+FFFD at the same places as a one-shot decode, so the deltas concatenated equal
    `tokenizer.decode(all_ids)`. Each call costs O(new tokens): only the new ids are turned into bytes.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """The text that `ids` complete; bytes of a character still unfinished wait for the next call."""
        ids = [ids] if isinstance(ids, Integral) else ids  # also numpy integers
        data = self.tokenizer.decode_bytes(ids, skip_special_tokens=self.skip_special_tokens)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """At the end of the stream: held-back bytes of an unfinished character become U+FFFD, as decode does."""
        return self._utf8.decode(b"", final=True)
