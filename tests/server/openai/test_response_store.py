"""The Responses API's store: bounded in entries and in bytes, least recently used dropped first."""

from __future__ import annotations

import json

from server.openai.response_store import ResponseStore


def response(i: int, text: str = "x") -> dict:
    return {"id": f"resp_{i}", "output": [{"type": "message", "content": [{"text": text}]}]}


def test_least_recently_used_is_dropped_past_the_entry_bound():
    store = ResponseStore(max_entries=3, max_bytes=10**6)
    for i in range(3):
        store.put(response(i), [])
    assert store.get("resp_0") is not None  # now the most recently used
    store.put(response(3), [])
    assert [r for r in ("resp_0", "resp_1", "resp_2", "resp_3") if store.get(r)] == ["resp_0", "resp_2", "resp_3"]
    assert len(store) == 3


def test_bytes_bound_counts_the_response_and_its_conversation():
    items = [{"type": "message", "content": [{"type": "input_text", "text": "y" * 100}]}]
    size = len(json.dumps(response(0))) + len(json.dumps(items))
    store = ResponseStore(max_entries=100, max_bytes=2 * size)
    for i in range(3):
        store.put(response(i), items)
    assert store.get("resp_0") is None and store.get("resp_1") and store.get("resp_2")
    assert store.nbytes == 2 * size
    store.put(response(9, "z" * (3 * size)), [])  # larger than the whole store: not kept, nothing dropped
    assert store.get("resp_9") is None and len(store) == 2


def test_delete_and_replace_keep_the_byte_count_true():
    store = ResponseStore(max_entries=10, max_bytes=10**6)
    store.put(response(1), [])
    store.put(response(1, "longer text"), [])
    assert len(store) == 1 and store.nbytes == len(json.dumps(response(1, "longer text"))) + 2
    assert store.delete("resp_1") and not store.delete("resp_1") and store.nbytes == 0


def test_a_store_of_no_entries_keeps_nothing():
    store = ResponseStore(max_entries=0, max_bytes=10**6)
    store.put(response(1), [])
    assert store.get("resp_1") is None and len(store) == 0
