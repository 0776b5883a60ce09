"""Stored responses of the Responses API (`store: true`): each response with the conversation that led to it, so
that `previous_response_id` continues it and `GET /v1/responses/{id}` retrieves it.

Serving-layer state, per process, bounded in entries and in bytes: the least recently used response is dropped
first. Behind several replicas a conversation must stay on one replica, or the client sends the full input.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    response: dict            # the response object, as returned
    input_items: list[dict]   # the conversation before its output: earlier turns and this request's input
    nbytes: int


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, input_items: list[dict]) -> None:
        """Keep a response (dropping the least recently used ones past the bounds); one larger than the whole
        store is not kept."""
        size = len(json.dumps(response)) + len(json.dumps(input_items))
        self.delete(response["id"])
        if self.max_entries < 1 or size > self.max_bytes:
            return
        self._entries[response["id"]] = StoredResponse(response, input_items, size)
        self.nbytes += size
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry is not None
