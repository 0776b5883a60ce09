"""Admission is bounded by waiting sequences and by waiting prompt tokens; a refusal is EngineOverloaded (a 503
with Retry-After at the API, see test_api_errors.py)."""

import pytest

from server.engine.block_pool import BlockPool
from server.engine.exceptions import EngineOverloaded
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence


def seq(rid: str, n_tokens: int) -> Sequence:
    return Sequence(rid, 0, list(range(1, n_tokens + 1)), SamplingParams(), 16, frozenset())


def test_waiting_prompt_tokens_are_bounded():
    scheduler = Scheduler(num_slots=1, blocks=BlockPool(16, 16), max_num_batched_tokens=64, max_waiting=100, max_waiting_tokens=100)
    scheduler.add([seq("a", 150)])  # alone in the queue: always let in (max_model_len bounds it)
    with pytest.raises(EngineOverloaded, match="150 prompt tokens are waiting"):
        scheduler.add([seq("b", 1)])
    scheduler.waiting.clear()
    scheduler.add([seq("c", 60)])
    scheduler.add([seq("d", 40)])  # exactly at the bound
    with pytest.raises(EngineOverloaded):
        scheduler.add([seq("e", 1)])
    assert [s.request_id for s in scheduler.waiting] == ["c", "d"]  # a refusal leaves the queue as it was


def test_waiting_sequences_are_bounded():
    scheduler = Scheduler(num_slots=1, blocks=BlockPool(16, 16), max_num_batched_tokens=64, max_waiting=2)
    scheduler.add([seq("a", 5), seq("a", 5)])
    with pytest.raises(EngineOverloaded, match="2 requests are waiting"):
        scheduler.add([seq("b", 5)])
