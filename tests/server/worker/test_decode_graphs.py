"""The CUDA decode step (server/decode_graphs.py) without a GPU: the step its graphs capture, run eagerly over the
same static buffers, with the Triton attention kernel in Triton's interpreter. On CUDA, graph replay against
eager decoding is tests/model/test_cuda.py's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kernels.triton_decode import available as triton_available
from model.kv_cache import KVCache
from model.loading import build_model
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.worker.decode.graphs import CapturedDecode, graph_sizes
from tests.helpers import set_attention_impl
from tests.server.engine.helpers import assert_all_slots_free, make_engine, run

BLOCK = 16


def test_graph_sizes_cover_every_batch_with_little_padding():
    assert graph_sizes(1) == [1]
    assert graph_sizes(8) == [1, 2, 4, 8]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    for n in range(1, 257):
        fit = next(s for s in sizes if s >= n)
        assert fit - n < max(8, n // 2 + 1)  # at most 7 rows of padding past 8


@pytest.mark.skipif(not triton_available("cpu"), reason="needs Triton's interpreter")
def test_captured_step_equals_the_reference_forward(tiny_llama3):
    """Three sequences of different lengths decode 20 steps through the step's buffers (batch size 4 of the
    ladder: one padding row); logits equal the reference path's, and padding writes nothing to the cache."""
    config = tiny_llama3.config
    ours = build_model(config, tiny_llama3.model.state_dict().items())
    set_attention_impl(ours, "triton")
    reference = build_model(config, tiny_llama3.model.state_dict().items())
    set_attention_impl(reference, "reference")
    caches = [KVCache(config, num_blocks=24, block_size=BLOCK) for _ in range(2)]
    step = CapturedDecode(ours, caches[0], max_batch=6, max_model_len=256, device=torch.device("cpu"))
    assert step.size_for(3) == 4

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128_000, (n,), generator=gen).tolist() for n in (5, 16, 37)]
    tables = [(3, 9), (1, 2, 4), (6, 7, 10, 11, 12)]  # block 0 (where padding rows point) is nobody's
    for model, cache in zip((ours, reference), caches):
        model(ForwardBatch.build([SequenceChunk(0, 0, p, blocks=t) for p, t in zip(prompts, tables)], "cpu", BLOCK),
              cache)
    tokens = [p[-1] for p in prompts]
    positions = [len(p) for p in prompts]
    for _ in range(20):
        got = step.run(tokens, positions, tables)
        chunks = [SequenceChunk(0, pos, [t], blocks=tb) for t, pos, tb in zip(tokens, positions, tables)]
        want = reference(ForwardBatch.build(chunks, "cpu", BLOCK), caches[1])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        tokens = want.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-4, rtol=0)  # the same rows written
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=1e-4, rtol=0)
    assert caches[0].k[:, 0].abs().max() == 0 and caches[0].v[:, 0].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager-captured", "compiled-captured"])
def test_graph_replay_gives_the_eager_logits_on_cuda(tiny_llama3, compile):
    """Twenty steps of three sequences replayed from CUDA graphs against the eager forward over a copy of the
    cache, bf16: logits within bf16 rounding, the same greedy tokens wherever the top two are not near a tie."""
    config, device = tiny_llama3.config, torch.device("cuda")
    model = build_model(config, tiny_llama3.model.state_dict().items(), device=device, dtype=torch.bfloat16)
    caches = [KVCache(config, num_blocks=24, block_size=BLOCK, dtype=torch.bfloat16, device=device) for _ in range(2)]
    step = CapturedDecode(model, caches[0], max_batch=6, max_model_len=256, device=device, compile=compile)
    assert step.prepare() and step.mode == ("compiled" if compile else "eager") and 4 in step.graphs

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128_000, (n,), generator=gen).tolist() for n in (5, 16, 37)]
    tables = [(3, 9), (1, 2, 4), (6, 7, 10, 11, 12)]
    for cache in caches:
        model(ForwardBatch.build([SequenceChunk(0, 0, p, blocks=t) for p, t in zip(prompts, tables)], device, BLOCK),
              cache)
    tokens, positions = [p[-1] for p in prompts], [len(p) for p in prompts]
    for _ in range(20):
        got = step.run(tokens, positions, tables).clone()
        chunks = [SequenceChunk(0, pos, [t], blocks=tb) for t, pos, tb in zip(tokens, positions, tables)]
        want = model(ForwardBatch.build(chunks, device, BLOCK), caches[1])
        error = (got - want).abs().amax(-1)
        assert float(error.max()) < 0.02 * float(want.abs().max())
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
        tokens = want.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    assert caches[0].k[:, 0].abs().max() == 0  # padding rows wrote nothing


@pytest.mark.skipif(not triton_available("cpu"), reason="needs Triton's interpreter")
def test_engine_on_the_captured_step_gives_the_eager_outputs(tiny_llama3):
    """The runner wired to the CUDA step (its static buffers and ladder, the Triton kernel), run eagerly on CPU:
    ten requests of different lengths, one with n=2, in a cache small enough to preempt, give the greedy tokens
    the eager engine gives, and the cache ends empty."""
    config = tiny_llama3.config
    ours = build_model(config, tiny_llama3.model.state_dict().items())
    set_attention_impl(ours, "triton")
    loaded = dataclasses.replace(tiny_llama3, model=ours)
    per_block = KVCache.bytes_per_token(config, torch.float32) * BLOCK
    settings = dict(kv_cache_memory=24 * per_block, block_size=BLOCK, max_num_seqs=6, max_model_len=256,
                    max_num_batched_tokens=64)
    engine = make_engine(loaded, **settings)
    runner = engine.runner
    runner.decode_step = CapturedDecode(ours, runner.cache, 6, engine.max_model_len, torch.device("cpu"))

    gen = torch.Generator().manual_seed(11)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    requests = {f"r{i}": (torch.randint(0, 128_000, (5 + 9 * i,), generator=gen).tolist(), params)
                for i in range(10)}
    requests["n2"] = (requests["r3"][0][:30], SamplingParams(temperature=0.0, max_tokens=20, n=2, ignore_eos=True))
    got = run(engine, requests)
    want = run(make_engine(tiny_llama3, **settings), requests)
    assert engine.stats().num_preemptions > 0
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}
    assert all(len(r.token_ids) == 20 for r in got.values()) and len(got) == 12
    assert_all_slots_free(engine)
    assert engine.stats().blocks_used == 0


@pytest.mark.gpu
def test_cuda_engine_stays_within_its_memory_fraction_and_decodes_through_graphs(tiny_llama3):
    """--gpu-memory-utilization 0.3: the cache is sized from memory measured after loading and a warm-up pass,
    and after serving, this process holds at most that fraction of the device; the decode step is captured."""
    config, device = tiny_llama3.config, torch.device("cuda")
    model = build_model(config, tiny_llama3.model.state_dict().items(), device=device, dtype=torch.bfloat16)
    loaded = dataclasses.replace(tiny_llama3, model=model)
    engine = LLMEngine(loaded, EngineConfig(device="cuda", gpu_memory_utilization=0.3, max_num_seqs=32,
                                            max_model_len=1024, max_num_batched_tokens=1024))
    assert isinstance(engine.runner.decode_step, CapturedDecode) and engine.runner.decode_step.graphs
    gen = torch.Generator().manual_seed(4)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = run(engine, {f"r{i}": (torch.randint(0, 128_000, (40 + i,), generator=gen).tolist(), params)
                           for i in range(40)})
    assert all(len(r.token_ids) == 16 for r in results.values()) and len(results) == 40
    assert engine.stats().blocks_used == 0
    free, total = torch.cuda.mem_get_info(device)
    assert torch.cuda.memory_reserved(device) <= 0.3 * total
    assert engine.runner.cache.nbytes > 0.1 * total  # most of the fraction went to the cache
