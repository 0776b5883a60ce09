"""Streaming deltas against the one-shot decode of all ids."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.paths import default_gguf_path, llama3_tokenizer_path
from model.text.detokenizer import IncrementalDetokenizer
from model.text.tokenizer import Tokenizer

# Byte-level BPE splits these characters across tokens, so streaming must hold bytes back.
SPLIT_TEXT = "🤗👨‍👩‍👧 中文字符 한국어 ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 é\u0301 Ωμέγα"


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def tokenizer(request):
    if request.param == "llama3":
        return Tokenizer.from_tiktoken_file(llama3_tokenizer_path())
    return Tokenizer.from_gguf(default_gguf_path())


def incomplete_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of tokens that hold part of a character: they come from text with multi-byte characters."""
    ids = tokenizer.encode(SPLIT_TEXT)
    return sorted({i for i in ids if not is_utf8(tokenizer.decode_bytes([i]))})


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stream(tokenizer: Tokenizer, chunks: list[list[int]], skip_special_tokens: bool) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detokenizer.feed(chunk) for chunk in chunks] + [detokenizer.flush()]


def test_split_characters_are_held_back(tokenizer):
    ids = tokenizer.encode(SPLIT_TEXT)
    assert incomplete_token_ids(tokenizer), "the test text should split characters across tokens"
    deltas = stream(tokenizer, [[i] for i in ids], skip_special_tokens=False)
    assert "".join(deltas) == SPLIT_TEXT
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas  # some tokens completed no character


def test_unfinished_character_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("ok 🤗")
    *complete, last = ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = detokenizer.feed(complete)
    assert text == tokenizer.decode(complete).rstrip("\ufffd")
    assert text + detokenizer.flush() == tokenizer.decode(complete)
    assert detokenizer.flush() == ""


def test_special_tokens(tokenizer):
    ids = tokenizer.encode(f"{tokenizer.bos_token}🤗 hi{tokenizer.bos_token}", allow_special=True)
    for skip in (False, True):
        assert "".join(stream(tokenizer, [[i] for i in ids], skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_work_per_call_is_proportional_to_new_tokens(tokenizer, monkeypatch):
    seen = []
    decode_bytes = tokenizer.decode_bytes
    monkeypatch.setattr(tokenizer, "decode_bytes", lambda ids, **kw: seen.append(len(ids)) or decode_bytes(ids, **kw))
    ids = tokenizer.encode(SPLIT_TEXT * 3)
    stream(tokenizer, [[i] for i in ids], skip_special_tokens=False)
    assert seen and max(seen) == 1  # never re-decodes the history


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_random_ids_stream_like_full_decode(tokenizer, data, skip):
    pool = incomplete_token_ids(tokenizer)
    any_id = st.integers(0, tokenizer.vocab_size - 1)
    special = st.sampled_from(sorted(tokenizer.special_token_ids))
    ids = data.draw(st.lists(st.one_of(st.sampled_from(pool), any_id, special), max_size=30))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    chunks, start = [], 0
    for size in sizes:
        if start < len(ids):
            chunks.append(ids[start:start + size])
            start += size
    deltas = stream(tokenizer, chunks, skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in delta for delta in deltas)
    assert sum(delta.count("\ufffd") for delta in deltas) == full.count("\ufffd")
