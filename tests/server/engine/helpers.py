"""Helpers for driving an `LLMEngine` directly in tests: build one, run requests to the end, collect their
deltas, check that nothing is left held."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: BaseException | None = None
    metrics: object = None  # the request's RequestMetrics, on its first sample's result
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when the request asks for them


def make_engine(loaded, **overrides) -> LLMEngine:
    config = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256)
    config.update(overrides)
    return LLMEngine(loaded, EngineConfig(enforce_eager=True, **config))


def collect(outputs, results: dict) -> None:
    for out in outputs:
        if out.error is not None:
            results.setdefault((out.request_id, 0), Result()).error = out.error
        if out.metrics is not None:
            results.setdefault((out.request_id, 0), Result()).metrics = out.metrics
        for d in out.deltas:
            r = results.setdefault((out.request_id, d.index), Result())
            r.text += d.text
            r.token_ids += d.token_ids
            r.logprobs += d.logprobs or []
            if d.finish_reason:
                r.finish_reason, r.stop_reason = d.finish_reason, d.stop_reason


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    results: dict = {}
    while engine.has_work():
        collect(engine.step(), results)
    return results


def prompts(tokenizer, n: int) -> list[list[int]]:
    topics = ["the ocean", "a robot", "Paris", "winter", "mathematics", "a cat", "the moon", "coffee",
              "a library", "trains", "music", "a forest", "volcanoes", "chess", "bread", "the internet"]
    return [tokenizer.encode(f"Write one sentence about {topics[i % len(topics)]}:" + " really" * (i % 5))
            for i in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def assert_all_slots_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.slots_used == 0 and stats.running == 0 and stats.waiting == 0
    assert engine.scheduler.num_free_slots == engine.config.max_num_seqs
    assert stats.blocks_used == 0 and engine.scheduler.blocks.num_available == stats.num_blocks  # no block leaked
    assert not engine.requests


def always_propose(engine: LLMEngine) -> LLMEngine:
    """Proposals up to max_rows every step, whatever they cost (the budget without measurements, as a split model's
    engine runs it): for tests of what speculation computes, not of when it pays."""
    from server.engine.speculation import SpeculationBudget

    engine.scheduler.budget = SpeculationBudget(engine.scheduler.speculation)
    return engine
