"""The OpenAI API end to end: a real server on a loopback port, called with the official SDK and with httpx.

Where the text matters the model is SmolLM2; its answers are checked against the model run directly.
"""

from __future__ import annotations

import pytest
import torch

from model.batch import ForwardBatch, SequenceChunk
from model.kv_cache import KVCache
from model.loading import LoadedModel
from server import __version__
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.server.conftest import assert_openai_error, metric, scrape, sse_events

LOGPROB_TOL = 2e-3
PROMPT = "The three primary colors are"
IGNORE_EOS = {"ignore_eos": True}


def reference_greedy(loaded: LoadedModel, prompt_ids: list[int], num_tokens: int):
    """Greedy decoding by running the model directly on one sequence in a cache of its own.

    Returns the generated ids and the log-softmax rows: rows[i] is the distribution of the token at i + 1.
    """
    model = loaded.model
    cache = KVCache(loaded.config, 1, len(prompt_ids) + num_tokens)
    with torch.inference_mode():
        logits = model(ForwardBatch.build([SequenceChunk(0, 0, list(prompt_ids), all_logits=True)]), cache)
        rows = list(torch.log_softmax(logits, dim=-1))  # one per prompt token
        ids: list[int] = []
        for _ in range(num_tokens):
            token = int(rows[-1].argmax())
            ids.append(token)
            position = len(prompt_ids) + len(ids) - 1
            if position + 1 < cache.block_size:  # one block: the sequence's slot
                logits = model(ForwardBatch.build([SequenceChunk(0, position, [token])]), cache)
                rows.append(torch.log_softmax(logits[0], dim=-1))
    return ids, rows


def top_values(row: torch.Tensor, k: int) -> list[float]:
    return row.topk(k).values.tolist()


def chatml(messages: list[tuple[str, str]]) -> str:
    """SmolLM2's chat format, written out by hand rather than rendered from its template."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


# -- completions ---------------------------------------------------------------------------------------------------

def test_completion_greedy_logprobs_match_the_model_run_directly(smol_server, smollm):
    tokenizer = smollm.tokenizer
    prompt_ids = tokenizer.encode_prompt(PROMPT)
    ref_ids, rows = reference_greedy(smollm, prompt_ids, 10)

    out = smol_server.client().completions.create(model=smol_server.model, prompt=PROMPT, max_tokens=10,
                                                  temperature=0, logprobs=3, extra_body=IGNORE_EOS)
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 10
    assert out.usage.total_tokens == len(prompt_ids) + 10

    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ref_ids]
    for i, token in enumerate(ref_ids):
        row = rows[len(prompt_ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[token].item(), abs=LOGPROB_TOL)
        top = lp.top_logprobs[i]
        assert len(top) == 3
        assert sorted(top.values(), reverse=True) == pytest.approx(top_values(row, 3), abs=LOGPROB_TOL)
        assert max(top, key=top.get) == lp.tokens[i]  # greedy: the chosen token is the most likely one
    assert lp.text_offset[0] == 0
    for i in range(1, len(lp.tokens)):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


@pytest.mark.parametrize("form", ["string", "strings", "token_ids", "token_id_lists"])
def test_completion_prompt_forms(smol_server, smollm, form):
    tokenizer = smollm.tokenizer
    texts = ["Water boils at", "The opposite of hot is"]
    ids = [tokenizer.encode_prompt(t) for t in texts]
    prompt = {"string": texts[0], "strings": texts, "token_ids": ids[0], "token_id_lists": ids}[form]
    expected = [ids[0]] if form in ("string", "token_ids") else ids

    with smol_server.http() as http:
        r = http.post("/v1/completions", json={"model": smol_server.model, "prompt": prompt, "max_tokens": 4,
                                               "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == smol_server.model
    assert body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == list(range(len(expected)))
    for choice, prompt_ids in zip(body["choices"], expected):
        ref_ids, _ = reference_greedy(smollm, prompt_ids, 4)
        assert choice["text"] == tokenizer.decode(ref_ids, skip_special_tokens=True)
        assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(p) for p in expected)
    assert usage["completion_tokens"] == 4 * len(expected)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_temperature_zero_equals_the_engine(smol_server, smollm):
    prompt = "Once upon a time, in a small village,"
    engine = LLMEngine(smollm, EngineConfig(enforce_eager=True, max_model_len=128, max_num_seqs=1,
                                            max_num_batched_tokens=64))
    engine.add_request("direct", smollm.tokenizer.encode_prompt(prompt), SamplingParams(temperature=0, max_tokens=16))
    text, finish = "", None
    while engine.has_work():
        for out in engine.step():
            for d in out.deltas:
                text += d.text
                finish = d.finish_reason or finish

    out = smol_server.client().completions.create(model=smol_server.model, prompt=prompt, max_tokens=16,
                                                  temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == finish


def test_completion_stream_concatenates_to_the_full_response(smol_server):
    client = smol_server.client()
    args = dict(model=smol_server.model, prompt="A good breakfast includes", max_tokens=16, temperature=0)
    full = client.completions.create(**args)

    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].text
    assert finishes == [full.choices[0].finish_reason]
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # include_usage: a last chunk with usage

    with smol_server.http() as http, http.stream("POST", "/v1/completions", json={**args, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == full.choices[0].text
    assert all("usage" not in e for e in events)  # only when asked for


def test_completion_n_choices_are_complete_and_distinct(smol_server):
    out = smol_server.client().completions.create(model=smol_server.model, prompt="My favourite animal is the",
                                                  n=3, max_tokens=6, temperature=1.0, seed=7, logprobs=0,
                                                  extra_body=IGNORE_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert c.finish_reason == "length"
        assert len(c.logprobs.tokens) == 6 and "".join(c.logprobs.tokens) == c.text
    assert len({c.text for c in out.choices}) > 1, "n samples drawn at temperature 1 should not all agree"
    assert out.usage.completion_tokens == 18


def test_completion_n_with_several_prompts_streamed(smol_server, smollm):
    prompts = ["Cats are", "Dogs are"]
    body = {"model": smol_server.model, "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0.8,
            "seed": 1, "ignore_eos": True, "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    with smol_server.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
    tokens: dict[int, int] = {}
    finished: dict[int, list] = {}
    for e in events[:-1]:
        (choice,) = e["choices"]
        tokens[choice["index"]] = tokens.get(choice["index"], 0) + len(choice["logprobs"]["tokens"])
        if choice["finish_reason"]:
            finished.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert tokens == {0: 3, 1: 3, 2: 3, 3: 3}  # index = prompt * n + sample
    assert finished == {i: ["length"] for i in range(4)}
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == sum(len(smollm.tokenizer.encode_prompt(p)) for p in prompts)
    assert usage["completion_tokens"] == 12


def stop_cases(text: str) -> tuple[str, str]:
    """Two words of `text` that first occur after its start, the later one first."""
    words = [w for w in dict.fromkeys(text.split()) if len(w) >= 3 and text.find(w) > 0]
    assert len(words) >= 2, f"the greedy text is too short to pick stop strings from: {text!r}"
    return words[-1], words[len(words) // 2]


def test_completion_stop_strings(smol_server):
    client = smol_server.client()
    args = dict(model=smol_server.model, prompt="Here is a short story about a dragon:", temperature=0,
                max_tokens=20, extra_body=IGNORE_EOS)
    full = client.completions.create(**args).choices[0].text
    late, early = stop_cases(full)

    for stop in (early, ["no such text ~~", early], [late, early]):
        stops = [stop] if isinstance(stop, str) else stop
        cut = min(full.find(s) for s in stops if s in full)
        out = client.completions.create(**args, stop=stop).choices[0]
        assert out.text == full[:cut]
        assert not any(s in out.text for s in stops)
        assert out.finish_reason == "stop"
        assert out.model_extra["stop_reason"] == full[cut:cut + len(out.model_extra["stop_reason"])]

    streamed = list(client.completions.create(**args, stop=[late, early], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(early)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completion_echo(smol_server, smollm):
    tokenizer = smollm.tokenizer
    prompt = "The sun rises in the"
    prompt_ids = tokenizer.encode_prompt(prompt)
    ref_ids, rows = reference_greedy(smollm, prompt_ids, 4)
    client = smol_server.client()
    args = dict(model=smol_server.model, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                extra_body=IGNORE_EOS)

    out = client.completions.create(**args, logprobs=2).choices[0]
    generated = tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert out.text == prompt + generated
    lp = out.logprobs
    all_ids = prompt_ids + ref_ids
    assert lp.tokens == [tokenizer.decode([t]) for t in all_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for i in range(1, len(all_ids)):
        assert lp.token_logprobs[i] == pytest.approx(rows[i - 1][all_ids[i]].item(), abs=LOGPROB_TOL)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(top_values(rows[i - 1], 2),
                                                                                 abs=LOGPROB_TOL)
    assert lp.text_offset == [len(tokenizer.decode(all_ids[:i])) for i in range(len(all_ids))]

    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt + generated


# -- chat ----------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name a fruit that is yellow."}]


def test_chat_greedy_logprobs_match_the_model_run_directly(smol_server, smollm):
    tokenizer = smollm.tokenizer
    prompt_ids = tokenizer.encode(chatml([(m["role"], m["content"]) for m in MESSAGES]), allow_special=True)
    ref_ids, rows = reference_greedy(smollm, prompt_ids, 8)

    out = smol_server.client().chat.completions.create(model=smol_server.model, messages=MESSAGES, max_tokens=8,
                                                       temperature=0, logprobs=True, top_logprobs=2,
                                                       extra_body=IGNORE_EOS)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 8

    content = choice.logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in ref_ids]
    for c, token, row in zip(content, ref_ids, rows[len(prompt_ids) - 1:]):
        assert c.bytes == list(tokenizer.decode_bytes([token]))
        assert c.logprob == pytest.approx(row[token].item(), abs=LOGPROB_TOL)
        assert len(c.top_logprobs) == 2
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top_values(row, 2), abs=LOGPROB_TOL)
        assert c.top_logprobs[0].token == c.token
        assert all(t.bytes == list(t.token.encode()) for t in c.top_logprobs if "\ufffd" not in t.token)


def test_chat_stream_concatenates_to_the_full_response(smol_server):
    client = smol_server.client()
    args = dict(model=smol_server.model, messages=MESSAGES, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**args)
    text = full.choices[0].message.content
    assert text

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage

    with smol_server.http() as http, http.stream("POST", "/v1/chat/completions", json={**args, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text


def test_chat_content_parts_are_joined_text(smol_server, smollm):
    parts = [{"type": "text", "text": "Name a fruit"}, {"type": "text", "text": "that is yellow."}]
    messages = [MESSAGES[0], {"role": "user", "content": parts}]
    expected_ids = smollm.tokenizer.encode(chatml([("system", MESSAGES[0]["content"]),
                                                   ("user", "Name a fruit\nthat is yellow.")]), allow_special=True)
    ref_ids, _ = reference_greedy(smollm, expected_ids, 6)

    with smol_server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": smol_server.model, "messages": messages,
                                                    "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(expected_ids)
    assert body["choices"][0]["message"]["content"] == smollm.tokenizer.decode(ref_ids, skip_special_tokens=True)


def test_chat_n_and_stop(smol_server):
    client = smol_server.client()
    args = dict(model=smol_server.model, messages=MESSAGES, temperature=0, max_tokens=24, extra_body=IGNORE_EOS)
    full = client.chat.completions.create(**args).choices[0].message.content
    late, early = stop_cases(full)
    out = client.chat.completions.create(**args, n=2, stop=[late, early])
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:  # greedy: both samples are the same text, cut at the first stop string
        assert c.message.content == full[:full.find(early)]
        assert c.finish_reason == "stop"


def test_chat_prompt_has_exactly_one_bos(tiny_server, tiny_llama3):
    tokenizer = tiny_llama3.tokenizer
    bos = tokenizer.bos_token_id
    assert tokenizer.add_bos  # the tokenizer would add a BOS of its own: the server must not add a second
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    expected = tokenizer.encode("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n", allow_special=True)
    with tiny_server.http() as http:
        r = http.post("/tokenize", json={"model": tiny_server.model, "messages": messages})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        assert tokens == expected
        assert tokens.count(bos) == 1 and tokens[0] == bos
        assert r.json()["count"] == len(tokens)

        r = http.post("/v1/chat/completions", json={"model": tiny_server.model, "messages": messages,
                                                    "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tokens)

        # A completion prompt gets the tokenizer's BOS once, whether or not the text already starts with it.
        for prompt in ("Hello!", "<|begin_of_text|>Hello!"):
            r = http.post("/v1/completions", json={"model": tiny_server.model, "prompt": prompt, "max_tokens": 1})
            assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode("Hello!")) + 1


# -- models, version, tokenizer, metrics ---------------------------------------------------------------------------

def test_models(smol_server):
    client = smol_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [smol_server.model]
    card = client.models.retrieve(smol_server.model)
    assert card.id == smol_server.model and card.object == "model"
    assert card.model_extra["max_model_len"] == 512
    with smol_server.http() as http:
        body = http.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == smol_server.model


def test_version(tiny_server):
    with tiny_server.http() as http:
        r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": __version__}


def test_tokenize_detokenize_round_trip(tiny_server, tiny_llama3):
    text = "Tokenizers turn text into numbers — and back again. ✓"
    with tiny_server.http() as http:
        plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        with_bos = http.post("/tokenize", json={"prompt": text}).json()
        back = http.post("/detokenize", json={"tokens": plain["tokens"]}).json()
    assert plain["tokens"] == tiny_llama3.tokenizer.encode(text)
    assert with_bos["tokens"] == [tiny_llama3.tokenizer.bos_token_id] + plain["tokens"]
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 4096
    assert back == {"prompt": text}


def test_metrics(tiny_server, tiny_llama3):
    before = scrape(tiny_server)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert metric(before, tiny_server, gauge) == 0.0
    assert metric(before, tiny_server, "kv_cache_capacity_tokens") == 32 * 4096

    prompt = "Count the tokens in this prompt."
    with tiny_server.http() as http:
        r = http.post("/v1/completions", json={"model": tiny_server.model, "prompt": prompt, "max_tokens": 5,
                                               "ignore_eos": True})
    assert r.status_code == 200
    after = scrape(tiny_server)

    def delta(name, **labels):
        return metric(after, tiny_server, name, **labels) - metric(before, tiny_server, name, default=0.0, **labels)

    assert delta("prompt_tokens_total") == len(tiny_llama3.tokenizer.encode_prompt(prompt))
    assert delta("generation_tokens_total") == 5
    assert delta("request_success_total", finished_reason="length") == 1
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == 1
        assert delta(f"{histogram}_sum") > 0
    assert metric(after, tiny_server, "e2e_request_latency_seconds_bucket", le="+Inf") >= 1
    for gauge in ("num_requests_running", "kv_cache_usage_perc", "kv_cache_tokens"):
        assert metric(after, tiny_server, gauge) == 0.0


def test_vllm_metric_names_for_the_kubernetes_ecosystem(tiny_server):
    """The names, types, labels and ranges that the Gateway API Inference Extension, llm-d, KEDA and vLLM's
    router read, parsed with prometheus_client's own parser, sampled while a request runs and after."""
    from prometheus_client.parser import text_string_to_metric_families

    def families():
        with tiny_server.http() as http:
            text = http.get("/metrics").text
        return {f.name: f for f in text_string_to_metric_families(text)}

    with tiny_server.http() as http:
        before = families()
        stream = http.stream("POST", "/v1/completions", json={"model": tiny_server.model, "prompt": "Hi",
                                                              "max_tokens": 200, "ignore_eos": True, "stream": True})
        with stream as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            during = families()
            for _ in lines:
                pass
    tiny_server.wait_until_idle()
    after = families()
    expected = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                "vllm:kv_cache_usage_perc": "gauge", "vllm:time_to_first_token_seconds": "histogram",
                "vllm:time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
                "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
                "vllm:request_success": "counter", "vllm:cache_config_info": "gauge"}
    for name, kind in expected.items():
        assert after[name].type == kind, name
        assert all(s.labels.get("model_name") == tiny_server.model for s in after[name].samples), name

    def value(fams, name, suffix="", **labels):
        return next(s.value for s in fams[name].samples
                    if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value(during, "vllm:num_requests_running") == 1
    assert 0 < value(during, "vllm:kv_cache_usage_perc") <= 1
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0
    assert value(after, "vllm:generation_tokens", "_total") - value(before, "vllm:generation_tokens", "_total") == 200
    assert value(after, "vllm:request_success", "_total", finished_reason="length") >= 1
    assert value(after, "vllm:e2e_request_latency_seconds", "_count") >= 1
    info = after["vllm:cache_config_info"].samples[0]
    stats = tiny_server.engine.stats()
    assert info.value == 1 and int(info.labels["block_size"]) == 16 == stats.block_size
    assert int(info.labels["num_gpu_blocks"]) == stats.num_blocks == 32 * 4096 // 16  # 32 sequences at full length


def test_follow_up_chat_turn_reuses_the_conversation_prefix(smol_server, smollm):
    """The second turn's prompt starts with the first turn's prompt and answer: only the rest is prefilled,
    and the reply is what the model gives with nothing reused (checked by running it directly)."""
    client = smol_server.client()
    system = {"role": "system", "content": "You are a geography tutor. Keep every answer to one short sentence."}
    first = [system, {"role": "user", "content": "What is the capital of Italy?"}]
    answer = client.chat.completions.create(model=smol_server.model, messages=first, max_tokens=24,
                                            temperature=0).choices[0].message.content
    follow_up = first + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And of Spain?"}]
    before = scrape(smol_server)
    reply = client.chat.completions.create(model=smol_server.model, messages=follow_up, max_tokens=16,
                                           temperature=0)
    after = scrape(smol_server)
    hits = metric(after, smol_server, "prefix_cache_hit_tokens_total") - metric(
        before, smol_server, "prefix_cache_hit_tokens_total")
    prefilled = metric(after, smol_server, "prompt_tokens_total") - metric(before, smol_server, "prompt_tokens_total")
    assert hits >= 30 and hits + prefilled == reply.usage.prompt_tokens

    tokenizer = smollm.tokenizer
    from model.text.chat_template import render_chat
    ids = tokenizer.encode_prompt(render_chat(tokenizer.chat_template, follow_up, bos_token=tokenizer.bos_token,
                                              eos_token=tokenizer.eos_token))
    expected, _ = reference_greedy(smollm, ids, reply.usage.completion_tokens)
    assert tokenizer.decode(expected, skip_special_tokens=True) == reply.choices[0].message.content


def test_openapi_documents_errors_health_and_metrics(tiny_server):
    """What a client generator or a fuzzer reads: every route's error statuses with OpenAI's error body, /health's
    JSON body, /metrics' text content type; and a 405 names the allowed methods."""
    with tiny_server.http() as http:
        spec = http.get("/openapi.json").json()
        health = http.get("/health")
        wrong_method = http.delete("/v1/completions")
        metrics = http.get("/metrics")
    error_ref = "#/components/schemas/ErrorResponse"
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    expected = {"/v1/completions": {"400", "401", "404", "408", "413", "500", "503"},
                "/v1/chat/completions": {"400", "401", "404", "408", "413", "500", "503"},
                "/tokenize": {"400", "401", "404", "413", "503"}, "/health": {"503"}, "/metrics": {"401"}}
    for path, statuses in expected.items():
        (operation,) = spec["paths"][path].values()
        documented = {s for s in operation["responses"] if s.startswith(("4", "5")) and s != "422"}
        assert statuses <= documented, (path, documented)
        for status in statuses:
            assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"] == error_ref
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert health.status_code == 200 and health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok"}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert_openai_error(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"


def test_the_schema_states_the_ranges_the_server_enforces(tiny_server):
    """Each sampling field's range is in the OpenAPI schema, and a value just outside it is refused (400) while
    the bound itself is accepted."""
    with tiny_server.http() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]

        def bounds(model, name):
            prop = schemas[model]["properties"][name]
            number = next((o for o in prop.get("anyOf", [prop]) if o.get("type") in ("number", "integer")), prop)
            return {k: number[k] for k in ("minimum", "maximum", "exclusiveMinimum") if k in number}

        assert bounds("CompletionRequest", "temperature") == {"minimum": 0, "maximum": 2}
        assert bounds("CompletionRequest", "top_p") == {"exclusiveMinimum": 0, "maximum": 1}
        assert bounds("CompletionRequest", "n") == {"minimum": 1, "maximum": 128}
        assert bounds("CompletionRequest", "logprobs") == {"minimum": 0, "maximum": 20}
        assert bounds("ChatCompletionRequest", "top_logprobs") == {"minimum": 0, "maximum": 20}
        for field, inside, outside in (("temperature", 2, 2.01), ("presence_penalty", -2, -2.01), ("n", 128, 129),
                                       ("repetition_penalty", 2, 0), ("min_p", 1, 1.5), ("top_k", -1, -2)):
            body = {"model": tiny_server.model, "prompt": "Hi", "max_tokens": 1}
            assert http.post("/v1/completions", json={**body, field: inside}).status_code == 200, field
            r = http.post("/v1/completions", json={**body, field: outside})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_tokenize_takes_a_prompt_or_messages_as_its_schema_says(tiny_server):
    with tiny_server.http() as http:
        spec = http.get("/openapi.json").json()
        body = spec["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        forms = [s["$ref"].rsplit("/", 1)[1] for s in body["anyOf"]]
        assert forms == ["TokenizeCompletion", "TokenizeChat"]
        assert spec["components"]["schemas"]["TokenizeCompletion"]["required"] == ["prompt"]
        assert spec["components"]["schemas"]["TokenizeChat"]["required"] == ["messages"]
        assert http.post("/tokenize", json={}).status_code == 400
        assert http.post("/tokenize", json={"messages": []}).status_code == 400
        assert http.post("/tokenize", json={"prompt": "Hi"}).json()["count"] >= 1


def test_each_message_role_has_its_own_schema(tiny_server):
    with tiny_server.http() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
        r = http.post("/v1/chat/completions", json={"model": tiny_server.model, "max_tokens": 1, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "tool", "content": "21 degrees"}]})
    assert set(schemas["ToolMessage"]["required"]) == {"role", "content", "tool_call_id"}
    assert "tool_calls" in schemas["AssistantTurn"]["properties"]
    assert "tool_calls" not in schemas["UserMessage"]["properties"]
    assert_openai_error(r, 400, param="messages.1.tool_call_id")


def test_token_ids_are_bounded_by_the_vocabulary_in_the_schema(tiny_server, tiny_llama3):
    with tiny_server.http() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
        too_big = http.post("/detokenize", json={"tokens": [tiny_llama3.config.vocab_size]})
        as_float = http.post("/detokenize", json={"tokens": [1.0, 2]})
    item = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert item["minimum"] == 0 and item["maximum"] == tiny_llama3.config.vocab_size - 1
    assert too_big.status_code == 400
    assert as_float.status_code == 200  # 1.0 is an integer, as JSON Schema counts


def request_validator(spec: dict, model: str):
    """A validator of request bodies against the served document's schema for `model` (jsonschema's, not ours)."""
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}", **spec})


def test_rules_the_server_enforces_are_in_the_document(tiny_server):
    """A request the document calls invalid is refused with a 400 naming the field, and one it calls valid is
    served: tool_choice that needs tools, and empty grammar or regex strings."""
    user = [{"role": "user", "content": "Hi"}]
    with tiny_server.http() as http:
        spec = http.get("/openapi.json").json()
        chat, completion = request_validator(spec, "ChatCompletionRequest"), request_validator(spec, "CompletionRequest")
        cases = [(chat, "/v1/chat/completions", {"messages": user, "tool_choice": "required"}, "tool_choice"),
                 (chat, "/v1/chat/completions", {"messages": user, "tool_choice": {"type": "function", "function": {
                     "name": "f"}}, "tools": []}, "tool_choice"),
                 (completion, "/v1/completions", {"prompt": "Hi", "guided_grammar": ""}, "guided_grammar"),
                 (completion, "/v1/completions", {"prompt": "Hi", "guided_regex": ""}, "guided_regex"),
                 (completion, "/v1/completions", {"prompt": "Hi", "structured_outputs": {"grammar": ""}},
                  "structured_outputs.grammar")]
        for validator, path, body, param in cases:
            assert not validator.is_valid(body), body
            assert_openai_error(http.post(path, json={"model": tiny_server.model, "max_tokens": 1, **body}), 400,
                                param=param)
        for validator, path, body in ((chat, "/v1/chat/completions", {"messages": user, "tool_choice": "none"}),
                                      (chat, "/v1/chat/completions", {"messages": user, "tool_choice": "auto"}),
                                      (completion, "/v1/completions", {"prompt": "Hi", "guided_regex": "a"})):
            assert validator.is_valid(body), body
            r = http.post(path, json={"model": tiny_server.model, "max_tokens": 1, **body})
            assert r.status_code == 200, (body, r.text)


TOOL_HISTORY = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]


@pytest.mark.parametrize("server", ["smol_server", "tiny_server"])
def test_tokenize_prepares_messages_as_chat_completions_does(server, request):
    """A conversation with an earlier tool call (content null) and its result, on templates that know nothing of
    tools: /tokenize counts exactly the prompt chat completions runs, and the call is in it as JSON text."""
    live = request.getfixturevalue(server)
    with live.http() as http:
        tokenized = http.post("/tokenize", json={"model": live.model, "messages": TOOL_HISTORY})
        chat = http.post("/v1/chat/completions", json={"model": live.model, "messages": TOOL_HISTORY,
                                                       "max_tokens": 1})
    assert tokenized.status_code == 200, tokenized.text
    assert chat.status_code == 200, chat.text
    assert tokenized.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    text = live.engine.tokenizer.decode(tokenized.json()["tokens"])
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text and "21 degrees" in text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_usage_on_every_chunk(tiny_server, path):
    """vLLM's stream_options.continuous_usage_stats (load testers send it): each chunk's usage counts the tokens
    so far, and the last chunk's is the request's."""
    body = {"model": tiny_server.model, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    with tiny_server.http() as http, http.stream("POST", path, json=body) as r:
        events = sse_events(r)
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 6 and events[-1]["choices"] == []
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    assert len({u["prompt_tokens"] for u in usages}) == 1
