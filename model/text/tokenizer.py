"""The tokenizer: encode and decode on `tiktoken`, plus what a server needs around it (BOS, stop tokens, chat
template), built from Meta's tokenizer.model, a Hugging Face tokenizer.json or directory, or GGUF metadata."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tiktoken

from model.text.vocabulary import (BYTE_TO_CHAR, LLAMA3_BOS, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, STOP_TOKENS,
                                   Vocabulary, gguf_vocabulary, is_tiktoken_file, read_gguf_metadata,
                                   read_hf_tokenizer_json, read_tiktoken_ranks, token_bytes)

if TYPE_CHECKING:
    import gguf

__all__ = ["Tokenizer", "is_tiktoken_file"]


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes a token as its text or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _config_chat_template(config: dict, directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():  # where newer transformers save it
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template


class Tokenizer:
    """Encode and decode with a byte-level BPE vocabulary, plus the metadata a server needs around it."""

    def __init__(self, vocab: Vocabulary, *, bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos: bool = False, chat_template: str | None = None):
        ranks = dict(vocab.ranks)
        self._added = dict(vocab.added)
        self._token_of_added_id = {i: text for text, i in self._added.items()}
        self._limit = max([*ranks.values(), *self._added.values()]) + 1
        # Bytes missing from the vocabulary (SmolLM2 lacks a few never-merged ones) get ranks past every real id,
        # so tiktoken never fails on them; encode drops them afterwards, as llama.cpp does.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks.update({b: self._limit + n for n, b in enumerate(missing)})
        self._has_placeholders = bool(missing)
        self._encoding = tiktoken.Encoding("bpe", pat_str=vocab.pattern, mergeable_ranks=ranks,
                                           special_tokens=self._added)
        self._user_defined = frozenset(t for t, i in self._added.items() if i not in vocab.special_ids)
        self.vocab_size = len(ranks) - len(missing) + len(self._added)
        self.special_token_ids = frozenset(vocab.special_ids)
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.bos_token = bos_token if self.bos_token_id is not None else None
        self.eos_token = eos_token
        named_stops = {self.token_to_id(t) for t in (eos_token, *STOP_TOKENS) if t} - {None}
        self.eos_token_ids = frozenset({*eos_token_ids, *named_stops})
        self.add_bos = add_bos
        self.chat_template = chat_template

    # -- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, *, special_tokens: dict[str, int] | None = None,
                           **metadata) -> Tokenizer:
        """Meta's Llama 3 tokenizer.model; special tokens default to Meta's Llama 3.1 names."""
        ranks = read_tiktoken_ranks(path)
        if special_tokens is None:
            special_tokens = {text: len(ranks) + n for n, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
        vocab = Vocabulary(LLAMA3_PATTERN, ranks, special_tokens, frozenset(special_tokens.values()))
        metadata = {"bos_token": LLAMA3_BOS, "eos_token": "<|end_of_text|>", "add_bos": True, **metadata}
        return cls(vocab, **metadata)

    @classmethod
    def from_hf_json(cls, path: str | Path, **metadata) -> Tokenizer:
        """A Hugging Face tokenizer.json; BOS is the post-processor's, or Llama 3's when the vocabulary has it."""
        vocab, template_bos = read_hf_tokenizer_json(path)
        bos = template_bos or (LLAMA3_BOS if LLAMA3_BOS in vocab.added else None)
        metadata = {"bos_token": bos, "add_bos": template_bos is not None or bos == LLAMA3_BOS, **metadata}
        return cls(vocab, **metadata)

    @classmethod
    def from_gguf(cls, source: str | Path | Mapping[str, Any] | gguf.GGUFReader) -> Tokenizer:
        """The vocabulary in GGUF metadata: a file's path (read with `gguf.GGUFReader`), an open reader, or the
        metadata already read as a mapping (a faster header reader can pass its result)."""
        meta, name = read_gguf_metadata(source)
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            return tokens[meta[key]] if key in meta else None

        bos = token("tokenizer.ggml.bos_token_id")
        stops = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(gguf_vocabulary(meta, name), bos_token=bos, eos_token=token("tokenizer.ggml.eos_token_id"),
                   eos_token_ids=stops, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", bos == LLAMA3_BOS)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model directory: a tiktoken tokenizer.model if there is one, else tokenizer.json, plus
        tokenizer_config.json (BOS/EOS, add_bos_token, chat template) and generation_config.json (stop ids)."""
        directory = Path(path)
        config = _json_or_empty(directory / "tokenizer_config.json")
        stops = _json_or_empty(directory / "generation_config.json").get("eos_token_id", [])
        metadata = {"eos_token_ids": [stops] if isinstance(stops, int) else stops,
                    "chat_template": _config_chat_template(config, directory)}
        for key in ("bos_token", "eos_token"):
            if config.get(key):
                metadata[key] = _token_text(config[key])
        if "add_bos_token" in config:
            metadata["add_bos"] = bool(config["add_bos_token"])
        models = [directory / "original" / "tokenizer.model", directory / "tokenizer.model"]
        tiktoken_file = next((p for p in models if p.is_file() and is_tiktoken_file(p)), None)
        if tiktoken_file is not None:
            named = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
            return cls.from_tiktoken_file(tiktoken_file, special_tokens=named or None, **metadata)
        if (directory / "tokenizer.json").is_file():
            return cls.from_hf_json(directory / "tokenizer.json", **metadata)
        found = [p.name for p in models if p.is_file()]
        raise ValueError(f"no supported tokenizer in {directory}: looked for original/tokenizer.model and "
                         f"tokenizer.model (tiktoken format) and tokenizer.json"
                         + (" (a SentencePiece tokenizer.model is not supported)" if found else ""))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A directory, a .gguf file, a tokenizer.json or a tiktoken tokenizer.model."""
        path = Path(path)
        if path.is_dir():
            return cls.from_directory(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        return cls.from_hf_json(path) if path.suffix == ".json" else cls.from_tiktoken_file(path)

    # -- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With `allow_special`, special-token text ("<|eot_id|>") becomes its id; without, it is
        encoded as plain text (user-defined added tokens always match, as in Hugging Face). The one BOS rule: BOS is
        prepended iff `add_bos` and the ids do not already start with it (a template that writes bos_token)."""
        allowed = "all" if allow_special else self._user_defined
        ids = self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        if self._has_placeholders:
            ids = [i for i in ids if i < self._limit]
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt or rendered chat: special-token text is parsed, BOS follows `self.add_bos` (see `encode`)."""
        return self.encode(prompt, add_bos=self.add_bos, allow_special=True)

    def decode_bytes(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> bytes:
        """Raw bytes of `ids`; ids outside the vocabulary are skipped, as Hugging Face does."""
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        if not ids or (0 <= min(ids) and max(ids) < self._limit):
            try:
                return self._encoding.decode_bytes(ids)
            except KeyError:  # a gap in the id space
                pass
        return self._encoding.decode_bytes([i for i in ids if self._is_token_id(i)])

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in Hugging Face."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")

    # -- lookups ------------------------------------------------------------------------------------------------

    def _is_token_id(self, i: int) -> bool:
        if not 0 <= i < self._limit:  # also hides the placeholder ranks of missing bytes
            return False
        try:
            self._encoding.decode_single_token_bytes(i)
        except KeyError:
            return False
        return True

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token's text or of a byte-level token string ("Ġthe"), else None."""
        if token in self._added:
            return self._added[token]
        try:
            i = self._encoding.encode_single_token(token_bytes(token))
        except (KeyError, ValueError):
            return None
        return i if i < self._limit else None

    def id_to_token(self, i: int) -> str:
        """An added token's text or a byte-level token string, as Hugging Face's convert_ids_to_tokens."""
        if i in self._token_of_added_id:
            return self._token_of_added_id[i]
        if not self._is_token_id(i):
            raise KeyError(f"token id {i} is not in the vocabulary")
        return "".join(BYTE_TO_CHAR[b] for b in self._encoding.decode_single_token_bytes(i))
