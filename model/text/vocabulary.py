"""Byte-level BPE vocabularies as tiktoken needs them, read from Meta's tokenizer.model, a Hugging Face
tokenizer.json or GGUF metadata, with the pre-tokenizer regexes that reproduce each source's splitting.

tiktoken merges the adjacent pair whose concatenation has the lowest rank and returns ranks as token ids, so every
reader makes rank == token id and checks that this order agrees with the file's own merge list.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Meta's Llama 3 pre-tokenizer (tokenizer.json writes the same regex into its `Split`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's regex run on the chunks left after digits were split off (HF `Digits` then `ByteLevel`; llama.cpp's
# "smollm"/"starcoder"), folded into one regex: a digit ends a chunk, so no space joins a number, and a whitespace run
# right before a digit stays one piece ("  2" -> "  ", "2"), where plain GPT-2 would give " ", " 2".
DIGIT_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
DIGIT_RUN_PATTERN = DIGIT_PATTERN.replace(r"\p{N}|", r"\p{N}+|", 1)

# tokenizer.ggml.pre -> regex, for the byte-level vocabularies whose splitting we reproduce exactly. llama.cpp's
# converter names Meta's Llama 3 tokenizer.json "smaug-bpe" when its hash matches that model's copy of it (the same
# splitting regex as Llama 3's).
GGUF_PRE_PATTERNS = {
    "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN,
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
    import gguf  # only GGUF checkpoints need it

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
