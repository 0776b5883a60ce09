"""The async front of the engine: streaming, cancellation from the consumer side, errors, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.exceptions import EngineDead, EngineOverloaded, PromptTooLong
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_llama3):
    engine = AsyncEngine(LLMEngine(tiny_llama3, EngineConfig(enforce_eager=True, max_model_len=256, max_num_seqs=20,
                                                             max_num_batched_tokens=256, max_waiting=40)))
    yield engine
    engine.shutdown()


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def consume(engine: AsyncEngine, prompt: list[int], params: SamplingParams, stop_after: int | None = None):
    """Tokens and text of one request; with `stop_after`, walk away after that many tokens."""
    tokens, text = [], ""
    async for out in engine.generate(prompt, params):
        for d in out.deltas:
            tokens += d.token_ids
            text += d.text
        if stop_after is not None and len(tokens) >= stop_after:
            break
    return tokens, text


def test_cancelling_half_of_20_running_requests(engine):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(20)]

    async def main():
        tasks = [asyncio.create_task(consume(engine, p, params, stop_after=3 if i % 2 else None))
                 for i, p in enumerate(prompts)]
        results = await asyncio.gather(*tasks)
        await wait_until(lambda: engine.stats().slots_used == 0)
        return results

    results = asyncio.run(main())
    for i, (tokens, _) in enumerate(results):
        assert len(tokens) == (3 if i % 2 else 40)
    # the survivors' tokens are what each produces alone
    for i in (0, 6):
        alone, _ = asyncio.run(consume(engine, prompts[i], params))
        assert results[i][0] == alone
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.slots_used) == (0, 0, 0)


def test_task_cancellation_aborts_the_request(engine):
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        task = asyncio.create_task(consume(engine, [1, 2, 3], params))
        await wait_until(lambda: engine.stats().slots_used == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.stats().slots_used == 0, timeout=2.0)

    asyncio.run(main())


def test_refusals_surface_to_the_caller_and_leave_nothing_behind(engine):
    async def main():
        with pytest.raises(PromptTooLong):
            await consume(engine, list(range(1, 300)), SamplingParams())
        # flood: 20 slots, 40 waiting places; the rest are refused at once
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        results = await asyncio.gather(*(consume(engine, [5, 6, 7], params) for _ in range(100)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, EngineOverloaded)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert refused and served and len(refused) + len(served) == 100
        assert all(len(tokens) == 5 for tokens, _ in served)
        await wait_until(lambda: engine.stats().slots_used == 0)

    asyncio.run(main())


def test_stream_deltas_concatenate_to_the_final_text(smollm):
    engine = AsyncEngine(LLMEngine(smollm, EngineConfig(enforce_eager=True, max_model_len=256, max_num_seqs=4)))
    try:
        prompt = smollm.tokenizer.encode("Emoji and accents: café 🙂 naïve 日本語. Continue:")
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=["\n\n"])

        async def main():
            deltas, finish = [], None
            async for out in engine.generate(prompt, params):
                for d in out.deltas:
                    deltas.append((d.text, d.token_ids))
                    finish = d.finish_reason or finish
            return deltas, finish

        deltas, finish = asyncio.run(main())
        text = "".join(t for t, _ in deltas)
        tokens = [t for _, ids in deltas for t in ids]
        assert finish in ("stop", "length")
        full = smollm.tokenizer.decode(tokens, skip_special_tokens=True)
        assert full.startswith(text) and "\ufffd" not in "".join(t for t, _ in deltas[:-1])
        if finish == "length":
            assert text == full
        else:  # the stop string and whatever followed it in its token are cut
            assert full[len(text):].startswith("\n\n") and "\n\n" not in text
    finally:
        engine.shutdown()


def test_generate_after_shutdown_is_refused(tiny_llama3):
    engine = AsyncEngine(LLMEngine(tiny_llama3, EngineConfig(enforce_eager=True, max_model_len=64, max_num_seqs=2)))
    engine.shutdown()

    async def main():
        with pytest.raises(EngineDead):
            await consume(engine, [1, 2], SamplingParams())

    asyncio.run(main())
