"""The embedded SmolLM2-135M-Instruct as our loader builds it from the GGUF, against the same GGUF loaded by
`transformers`: greedy continuations token for token, and a coherent chat answer.

Both sides get the same token ids (our tokenizer's), so only the model is compared here; the tokenizer has its own
tests. Everything runs in float32 on CPU.
"""

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.text.chat_template import render_chat

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # from_pretrained(gguf_file=...) needs it

pytestmark = pytest.mark.slow  # transformers takes about 15 s to read the GGUF

NEW_TOKENS = 32
PROMPTS = {
    "fox": "The quick brown fox",
    "story": "Once upon a time, in a small village by the sea, there lived",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "science": "Water boils at 100 degrees Celsius. At the top of Mount Everest, water boils at",
    "french": "La tour Eiffel est située à",
    "numbers": "1, 2, 3, 5, 8, 13,",
}


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM from the same GGUF, with no EOS so that every continuation is NEW_TOKENS long
    (what to stop on is not under test here)."""
    from model.paths import default_gguf_path

    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    return hf.eval()


def hf_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(ids):].tolist()


def our_greedy(loaded, ids: list[int], new_tokens: int, stop: frozenset[int] = frozenset()) -> list[int]:
    """Prefill the prompt, then decode one token per forward call; stops after a token in `stop`."""
    cache = KVCache(loaded.config, num_blocks=1, block_size=len(ids) + new_tokens)
    logits = loaded.model(ForwardBatch.build([SequenceChunk(0, 0, ids)]), cache)  # [1, vocab]
    out = []
    while True:
        out.append(int(logits[0].argmax()))
        if len(out) == new_tokens or out[-1] in stop:
            return out
        position = len(ids) + len(out) - 1
        logits = loaded.model(ForwardBatch.build([SequenceChunk(0, position, out[-1:])]), cache)


def our_greedy_batched(loaded, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Every prompt in its own slot of one cache: one prefill call for all, then one decode call per step."""
    cache = KVCache(loaded.config, num_blocks=len(prompts), block_size=max(map(len, prompts)) + new_tokens)
    logits = loaded.model(ForwardBatch.build([SequenceChunk(i, 0, ids) for i, ids in enumerate(prompts)]), cache)
    outs = [[] for _ in prompts]
    for step in range(new_tokens):
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
        if step + 1 < new_tokens:
            chunks = [SequenceChunk(i, len(ids) + step, out[-1:]) for i, (ids, out) in enumerate(zip(prompts, outs))]
            logits = loaded.model(ForwardBatch.build(chunks), cache)
    return outs


@pytest.fixture(scope="module")
def ours(smollm) -> dict[str, list[int]]:
    """Our greedy continuation of each prompt, decoded alone."""
    encode = smollm.tokenizer.encode_prompt
    return {name: our_greedy(smollm, encode(text), NEW_TOKENS) for name, text in PROMPTS.items()}


@pytest.mark.parametrize("name", PROMPTS)
def test_greedy_continuation_matches_transformers(smollm, reference, ours, name):
    expected = hf_greedy(reference, smollm.tokenizer.encode_prompt(PROMPTS[name]), NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert ours[name] == expected, (smollm.tokenizer.decode(ours[name]), smollm.tokenizer.decode(expected))


def test_batched_greedy_equals_one_at_a_time(smollm, ours):
    prompts = [smollm.tokenizer.encode_prompt(text) for text in PROMPTS.values()]
    assert our_greedy_batched(smollm, prompts, NEW_TOKENS) == list(ours.values())


def test_chat_answer_is_coherent_and_matches_transformers(smollm, reference):
    tokenizer = smollm.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render_chat(tokenizer.chat_template, messages, bos_token=tokenizer.bos_token,
                         eos_token=tokenizer.eos_token)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")  # the GGUF's ChatML
    ids = tokenizer.encode_prompt(prompt)
    answer = our_greedy(smollm, ids, 48, stop=tokenizer.eos_token_ids)
    assert answer[-1] in tokenizer.eos_token_ids  # the model ended its turn
    text = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Paris" in text, text
    expected = hf_greedy(reference, ids, len(answer))
    assert answer == expected, (text, tokenizer.decode(expected))
