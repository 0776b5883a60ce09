"""The fast CPU configuration: int4 weights, bfloat16 and the compiled decode step, through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import load
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.server.engine.helpers import GREEDY, always_propose, assert_all_slots_free, collect, prompts, run


@pytest.fixture(scope="module")
def smollm_int4():
    return load(None, dtype=torch.bfloat16, quantization="auto")


def test_auto_quantization_serves_the_gguf_tensors_packed_as_stored(smollm_int4):
    assert smollm_int4.quantization == "packed"
    layer = smollm_int4.model.model.layers[0]
    assert (layer.self_attn.qkv_proj.bits, layer.mlp.down_proj.bits) == (4, 4)  # Q4_1 as stored, q/k/v fused
    head = smollm_int4.model.lm_head
    assert head.bits == 8 and head is smollm_int4.model.model.embed_tokens.table  # the tied Q8_0 embedding


@pytest.mark.slow
def test_default_configuration_is_batch_invariant_and_compiled(smollm_int4):
    """16 greedy requests arriving one a step (so decodes share steps with prompt chunks) give exactly what each
    gives alone, in the configuration `python -m server` runs by default (int4, bfloat16, compiled decode step).
    They arrive while the step compiles in the background, so the batch runs eagerly and then, from whichever step
    the compiled step arrives at, compiled; each request alone runs compiled."""
    ids = prompts(smollm_int4.tokenizer, 16)
    engine = LLMEngine(smollm_int4, EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256))
    together: dict = {}
    pending = list(enumerate(ids))
    eager_steps = 0
    while pending or engine.has_work():
        if pending:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        eager_steps += engine.runner.decode_step is None
        collect(engine.step(), together)
    assert_all_slots_free(engine)
    assert eager_steps > 0, "the first steps should run before the compiled step is ready"
    assert engine.runner.wait_compiled(), "the decode step should compile on this machine"
    for i, p in enumerate(ids):  # one request at a time, in the same engine (compiled once per cache geometry)
        alone = run(engine, {f"x{i}": (p, GREEDY)})[(f"x{i}", 0)]
        assert together[(str(i), 0)].token_ids == alone.token_ids, f"prompt {i} differs in a batch"
        assert len(alone.token_ids) == GREEDY.max_tokens


@pytest.mark.slow
def test_speculation_on_the_compiled_step_leaves_greedy_outputs_unchanged(smollm_int4):
    """n-gram speculation in the default configuration: its verifying rows run the compiled decode step (several
    positions of one sequence in one call), and every request gives the tokens it gives without speculation."""
    tok = smollm_int4.tokenizer
    texts = ["Copy this list exactly.\nList: red, green, blue, cyan, magenta, yellow, black, white.\nCopy: red,",
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "Write one sentence about a forest:"]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    requests = {f"r{i}": (tok.encode(t), greedy) for i, t in enumerate(texts)}
    config = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256)
    plain = run(LLMEngine(smollm_int4, EngineConfig(**config)), requests)
    engine = always_propose(LLMEngine(smollm_int4, EngineConfig(**config, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}))))
    assert engine.runner.decode_step is not None
    spec = run(engine, requests)
    assert {k: v.token_ids for k, v in spec.items()} == {k: v.token_ids for k, v in plain.items()}
    assert engine.stats().spec_accepted_tokens_total > 0
    assert_all_slots_free(engine)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager_and_answers(smollm_int4):
    """Teacher-forced over a real text, the compiled step gives the eager step's logits bit for bit at every
    position (every operation with rounding in it is one of our kernels, called as a C function by the compiled
    step and through Python in eager mode), and greedy chat still answers correctly."""
    tok = smollm_int4.tokenizer
    ids = tok.encode("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
                     "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
                     "from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece "
                     "of the 1889 World's Fair.")
    engine = LLMEngine(smollm_int4, EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256))
    assert engine.runner.wait_compiled()
    runner, step = engine.runner, engine.runner.decode_step
    eager_cache = KVCache(smollm_int4.config, 1, 256, dtype=torch.bfloat16)
    model = smollm_int4.model
    model(ForwardBatch.build([SequenceChunk(0, 0, ids[:1])]), eager_cache)
    table = tuple(range(40, 56))  # 16 blocks of the runner's pool, 256 tokens
    size = runner.cache.block_size
    model(ForwardBatch.build([SequenceChunk(0, 0, ids[:1], blocks=table)], block_size=size), runner.cache)
    for position in range(1, len(ids)):
        eager = model(ForwardBatch.build([SequenceChunk(0, position, [ids[position]], decode=True)]), eager_cache)
        compiled = step.run([ids[position]], [position], [table])
        assert torch.equal(eager, compiled), position

    from model.text.chat_template import render_chat
    text = render_chat(tok.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                       bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=True)
    answer = run(engine, {"r": (tok.encode_prompt(text), SamplingParams(temperature=0.0, max_tokens=32))})
    assert "Paris" in answer[("r", 0)].text
