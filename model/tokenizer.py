"""Byte-level BPE tokenizer on `tiktoken`, read from Meta's tokenizer.model, a Hugging Face tokenizer.json or GGUF.

tiktoken merges the adjacent pair whose concatenation has the lowest rank and returns ranks as token ids, so every
loader makes rank == token id and checks that this order agrees with the file's own merge list.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import tiktoken

# Meta's Llama 3 pre-tokenizer (tokenizer.json writes the same regex into its `Split`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's regex run on the chunks left after digits were split off (HF `Digits` then `ByteLevel`; llama.cpp's
# "smollm"/"starcoder"), folded into one regex: a digit ends a chunk, so no space joins a number, and a whitespace run
# right before a digit stays one piece ("  2" -> "  ", "2"), where plain GPT-2 would give " ", " 2".
DIGIT_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
DIGIT_RUN_PATTERN = DIGIT_PATTERN.replace(r"\p{N}|", r"\p{N}+|", 1)

# tokenizer.ggml.pre -> regex, for the byte-level vocabularies whose splitting we reproduce exactly.
GGUF_PRE_PATTERNS = {
    "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN,
    "gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN,
    "smollm": DIGIT_PATTERN, "starcoder": DIGIT_PATTERN,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

LLAMA3_BOS = "<|begin_of_text|>"
# Meta's Llama 3.1 reference names for the 256 special tokens after the 128,000 BPE ranks.
LLAMA3_SPECIAL_TOKENS = (
    LLAMA3_BOS, "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
)
# End-of-turn tokens that stop generation whenever the vocabulary has them (Llama 3 Instruct, ChatML).
STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, others go to U+0100+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_bytes(token: str, source: object = "vocabulary") -> bytes:
    """The bytes a byte-level BPE token string ("Ġthe") stands for."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        raise ValueError(f"{source}: token {token!r} is not in the GPT-2 byte-level alphabet; "
                         "only byte-level BPE vocabularies are supported") from None


@dataclass
class Vocabulary:
    """What tiktoken needs: a regex, BPE ranks (== ids) and the added tokens matched as whole strings."""

    pattern: str
    ranks: dict[bytes, int]
    added: dict[str, int]  # special and user-defined tokens, matched in text before BPE
    special_ids: frozenset[int]  # the added tokens that are control tokens, dropped by skip_special_tokens


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # also binascii.Error
            raise ValueError(f"{path}:{number}: not a tiktoken BPE file (expected '<base64> <rank>' lines)") from None
    return ranks


def is_tiktoken_file(path: Path) -> bool:
    """A SentencePiece tokenizer.model is a protobuf; Meta's Llama 3 one is text lines of base64 and rank."""
    with open(path, "rb") as file:
        return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", file.readline()) is not None


def check_merge_order(vocab: dict[str, int], merges: Iterable[tuple[str, str]], source: object) -> None:
    """tiktoken applies the merge whose result has the lowest id; that matches the file's merge priority iff the
    result ids never decrease along the merge list (ties: Llama 3 lists every split of a token as a merge)."""
    previous = -1
    for number, (left, right) in enumerate(merges):
        result = vocab.get(left + right)
        if result is None or result < previous:
            raise ValueError(f"{source}: merge {number} ({left!r}, {right!r}) gives token id {result}, after id "
                             f"{previous}; the token ids do not follow merge priority, which tiktoken needs")
        previous = result


def pattern_from_pre_tokenizer(pre: dict | None, source: object) -> str:
    """The single regex equal to a Hugging Face byte-level pre-tokenizer, for the layouts real checkpoints use."""
    steps = (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]) if pre else []
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise ValueError(f"{source}: pre_tokenizer {kinds} is not byte-level BPE (ByteLevel last, no prefix space)")
    first, use_regex = steps[:-1], steps[-1].get("use_regex", True)
    if not first and use_regex:
        return GPT2_PATTERN
    if kinds[:-1] == ["Split"] and not use_regex and first[0].get("behavior") == "Isolated" \
            and not first[0].get("invert") and "Regex" in first[0].get("pattern", {}):
        return first[0]["pattern"]["Regex"]
    if kinds[:-1] == ["Digits"] and use_regex:
        return DIGIT_PATTERN if first[0].get("individual_digits") else DIGIT_RUN_PATTERN
    raise ValueError(f"{source}: unsupported pre_tokenizer sequence {kinds} (use_regex={use_regex})")


def read_hf_tokenizer_json(path: str | Path) -> tuple[Vocabulary, str | None]:
    """The vocabulary and, when the post-processor prepends one, the BOS token's text."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: model {model.get('type')!r} is not byte-level BPE; only byte-level BPE is supported")
    if data.get("normalizer"):
        raise ValueError(f"{path}: normalizer {data['normalizer'].get('type')!r} is not supported in byte-level BPE")
    pattern = pattern_from_pre_tokenizer(data.get("pre_tokenizer"), path)
    added = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    special_ids = frozenset(token["id"] for token in data.get("added_tokens", []) if token.get("special"))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    check_merge_order(model["vocab"], merges, path)
    added_ids = set(added.values())
    ranks = {token_bytes(text, path): i for text, i in model["vocab"].items() if i not in added_ids}
    return Vocabulary(pattern, ranks, added, special_ids), _template_bos(data.get("post_processor"))


def _template_bos(post: dict | None) -> str | None:
    processors = (post.get("processors", []) if post.get("type") == "Sequence" else [post]) if post else []
    for processor in processors:
        if processor.get("type") == "TemplateProcessing" and "SpecialToken" in processor["single"][0]:
            return processor["single"][0]["SpecialToken"]["id"]
    return None


def read_gguf_metadata(source) -> tuple[Mapping[str, Any], str]:
    """The metadata of a GGUF path, `gguf.GGUFReader` or mapping, and a name for error messages."""
    if isinstance(source, Mapping):
        return source, "GGUF metadata"
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    return fields, str(getattr(reader.data, "filename", source))


def gguf_vocabulary(meta: Mapping[str, Any], name: str) -> Vocabulary:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{name}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
                         "only byte-level BPE ('gpt2') vocabularies are supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"{name}: tokenizer.ggml.pre {pre!r} is not supported; known: {sorted(GGUF_PRE_PATTERNS)}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    ids = {t: i for i, t in enumerate(tokens) if t not in added}
    check_merge_order(ids, (m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])), name)
    ranks = {token_bytes(t, name): i for t, i in ids.items()}
    specials = frozenset(i for i, kind in enumerate(types) if kind == GGUF_CONTROL)
    return Vocabulary(GGUF_PRE_PATTERNS[pre], ranks, added, specials)


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
