"""The Responses API through the official `openai` SDK and the OpenAI Agents SDK, on SmolLM2: text against the model
run directly, every streamed event against the SDK's own typed models, tools and formats against `jsonschema`,
stored conversations, and bad input."""

from __future__ import annotations

import asyncio
import json
import typing

import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from tests.server.conftest import assert_openai_error
from tests.server.openai.test_api import chatml, reference_greedy

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"], "additionalProperties": False}, "strict": True}
TIME = {"type": "function", "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}
# The SDK's event models by their `type`, for validating each event against its own model.
EVENT_MODELS = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
                for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


def greedy_text(smollm, turns: list[tuple[str, str]], max_tokens: int) -> tuple[str, int]:
    """The model's own greedy reply to a ChatML conversation (stopping at <|im_end|>), and the prompt's length."""
    tokenizer = smollm.tokenizer
    ids = tokenizer.encode(chatml(turns), allow_special=True)
    out, _ = reference_greedy(smollm, ids, max_tokens)
    stops = [i for i, t in enumerate(out) if t in tokenizer.eos_token_ids]
    return tokenizer.decode(out[:stops[0]] if stops else out, skip_special_tokens=True), len(ids)


def test_text_with_instructions_and_multi_turn_items(smol_server, smollm):
    client = smol_server.client()
    r = client.responses.create(model=smol_server.model, instructions="Answer in one sentence.",
                                input="What is the capital of France?", max_output_tokens=24, temperature=0)
    want, prompt_len = greedy_text(smollm, [("system", "Answer in one sentence."),
                                            ("user", "What is the capital of France?")], 24)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == want
    assert r.usage.input_tokens == prompt_len and r.usage.total_tokens == prompt_len + r.usage.output_tokens
    assert r.instructions == "Answer in one sentence." and r.max_output_tokens == 24 and r.temperature == 0
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"

    items = [{"role": "user", "content": "Name a colour."},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]}]
    r = client.responses.create(model=smol_server.model, input=items, max_output_tokens=16, temperature=0)
    want, _ = greedy_text(smollm, [("system", "You are a helpful AI assistant named SmolLM, trained by Hugging "
                                              "Face"), ("user", "Name a colour."), ("assistant", "Blue."),
                                   ("user", "Another one?")], 16)
    assert r.output_text == want


def events_of(server, **request) -> list[dict]:
    """A streamed response's events as the server sent them, each validated against the SDK's own event model."""
    body = {**{k: v for k, v in request.items() if k != "extra_body"}, **request.get("extra_body", {}), "stream": True}
    events = []
    with server.http() as http, http.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    for kind, data in zip(lines[::2], lines[1::2]):
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        events.append(event)
    for event in events:
        EVENT_MODELS[event["type"]].model_validate(event)  # pydantic validation, not the SDK's lenient construction
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_stream_events_build_the_non_streamed_response(smol_server, tools):
    """Seeded sampling: the stream's events, in OpenAI's order, end in the response a non-streamed request gives."""
    client = smol_server.client()
    request = dict(model=smol_server.model, input="Tell me about the weather in Paris.", max_output_tokens=40,
                   temperature=0.9, store=False, extra_body={"seed": 11})
    if tools:
        request.update(tools=[WEATHER, TIME], tool_choice="required")
    full = client.responses.create(**request).model_dump(exclude_unset=True)  # as the server sent it
    events = events_of(smol_server, **request)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == f"response.{full['status']}"
    final = events[-1]["response"]
    strip = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]  # noqa: E731
    assert strip(final["output"]) == strip(full["output"])
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert final["usage"][key] == full["usage"][key]
    details = final["usage"]["input_tokens_details"]  # the second run found the first one's prompt blocks
    assert details["cached_tokens"] > 0 and details["cached_tokens"] + details["cache_write_tokens"] == \
        final["usage"]["input_tokens"]

    for index, item in enumerate(final["output"]):
        mine = [e for e in events if e.get("output_index") == index]
        assert mine[0]["type"] == "response.output_item.added" and mine[-1]["type"] == "response.output_item.done"
        assert mine[-1]["item"] == item
        if item["type"] == "message":
            deltas = "".join(e["delta"] for e in mine if e["type"] == "response.output_text.delta")
            assert deltas == item["content"][0]["text"]
            assert [e["type"] for e in mine if "content_part" in e["type"]] == [
                "response.content_part.added", "response.content_part.done"]
        else:
            deltas = "".join(e["delta"] for e in mine if e["type"] == "response.function_call_arguments.delta")
            assert deltas == item["arguments"]  # byte for byte
            done = [e for e in mine if e["type"] == "response.function_call_arguments.done"]
            assert done[0]["arguments"] == item["arguments"] and done[0]["name"] == item["name"]
    if tools:
        assert {item["type"] for item in final["output"]} == {"function_call"}


def test_the_sdk_stream_helper_accumulates_the_response(smol_server):
    client = smol_server.client()
    request = dict(model=smol_server.model, input="What is the capital of France?", max_output_tokens=32,
                   temperature=0)
    full = client.responses.create(**request)
    with client.responses.stream(**request) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert full.status == final.status == "completed"
    assert "".join(texts) == final.output_text == full.output_text


def test_parse_with_a_pydantic_model(smol_server):
    class City(pydantic.BaseModel):
        name: str
        country: str

    parsed = smol_server.client().responses.parse(model=smol_server.model, input="Tell me about Paris.",
                                                  text_format=City, max_output_tokens=60, temperature=0)
    assert isinstance(parsed.output_parsed, City)
    assert parsed.text.format.type == "json_schema"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}, "auto"],
                         ids=["required", "named", "auto"])
def test_function_tools(smol_server, choice):
    client = smol_server.client()
    r = client.responses.create(model=smol_server.model, input="What is the weather in Paris right now?",
                                tools=[WEATHER, TIME], tool_choice=choice, max_output_tokens=60, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    schemas = {t["name"]: t["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        assert call.call_id.startswith("call_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    if choice == "auto":
        assert calls or r.output_text
    else:
        assert calls
    if isinstance(choice, dict):
        assert [c.name for c in calls] == ["get_time"]


def test_a_tool_result_continues_the_conversation_by_id_or_in_full(smol_server):
    client = smol_server.client()
    ask = "What is the weather in Paris right now?"
    first = client.responses.create(model=smol_server.model, input=ask, tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=40, temperature=0)
    (call,) = [item for item in first.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}
    by_id = client.responses.create(model=smol_server.model, previous_response_id=first.id, input=[result],
                                    tools=[WEATHER], max_output_tokens=24, temperature=0)
    in_full = client.responses.create(
        model=smol_server.model, tools=[WEATHER], max_output_tokens=24, temperature=0, input=[
            {"role": "user", "content": ask},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            result])
    assert by_id.previous_response_id == first.id
    assert by_id.output_text == in_full.output_text and by_id.usage.input_tokens == in_full.usage.input_tokens
    assert by_id.usage.input_tokens_details.cached_tokens > 0  # the first turn's blocks came from the prefix cache

    items = client.responses.input_items.list(by_id.id, order="asc")
    assert [i.type for i in items.data] == ["message", "function_call", "function_call_output"]
    assert items.data[1].call_id == call.call_id and items.data[2].output == "Sunny, 21 degrees."


def test_retrieve_list_and_delete(smol_server):
    client = smol_server.client()
    r = client.responses.create(model=smol_server.model, input=[{"role": "user", "content": f"Say {w}."}
                                                                for w in ("one", "two", "three")],
                                max_output_tokens=4, temperature=0, metadata={"run": "7"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"run": "7"}
    newest_first = client.responses.input_items.list(r.id, limit=2)
    assert [i.content[0].text for i in newest_first.data] == ["Say three.", "Say two."] and newest_first.has_more
    rest = client.responses.input_items.list(r.id, after=newest_first.last_id)
    assert [i.content[0].text for i in rest.data] == ["Say one."] and not rest.has_more
    with smol_server.http() as http:
        deleted = http.delete(f"/v1/responses/{r.id}")
        assert deleted.status_code == 200 and deleted.json() == {"id": r.id, "object": "response.deleted",
                                                                 "deleted": True}
        assert_openai_error(http.delete(f"/v1/responses/{r.id}"), 404, param="response_id")
        assert_openai_error(http.get(f"/v1/responses/{r.id}/input_items"), 404, param="response_id")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)

    unstored = client.responses.create(model=smol_server.model, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("body, status, param", [
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "http://x"}]}, 400, "tools.0.type"),
    ({"tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                 "environment": "linux"}]}, 400, "tools.0.type"),
    ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
    ({"background": True}, 400, "background"),
    ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}}, 400,
     "text.format.schema"),
    ({"tools": [WEATHER, WEATHER]}, 400, "tools.1.name"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input.0.type"),
    ({"input": "word " * 600}, 400, "input"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(smol_server, body, status, param):
    before = len(smol_server.state.responses.store)
    with smol_server.http() as http:
        r = http.post("/v1/responses", json={"model": smol_server.model, "input": "Hi", "max_output_tokens": 2,
                                             **body})
    assert_openai_error(r, status, param=param)
    assert len(smol_server.state.responses.store) == before
    smol_server.wait_until_idle()


def test_the_agents_sdk_runs_a_tool_agent_to_its_answer(smol_server):
    """OpenAI's Agents SDK with its default model (the Responses API) pointed at this server: an agent with one
    function tool calls it and answers, streamed and not; with an output_type as well, over the Responses and the
    Chat Completions models, its final output is the typed object."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    class Weather(pydantic.BaseModel):
        city: str
        summary: str

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0)
        responses = agents.OpenAIResponsesModel(model=smol_server.model, openai_client=client)
        settings = agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=100)
        agent = agents.Agent(name="weather", instructions="Answer briefly. Use the tool to look up weather.",
                             tools=[get_weather], model=responses, model_settings=settings)
        plain = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        streamed = agents.Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
        kinds = {event.type async for event in streamed.stream_events()}
        typed = {}
        for name, model in (("responses", responses),
                            ("chat", agents.OpenAIChatCompletionsModel(model=smol_server.model, openai_client=client))):
            for seed in range(8):  # a 135M model does not always stop calling: the SDK's flow is what is tested
                settings = agents.ModelSettings(tool_choice="required", temperature=1.0, max_tokens=80,
                                                extra_body={"seed": seed})
                typed_agent = agents.Agent(name="typed", instructions="Look up the weather with the tool once, "
                                           "then reply with the JSON answer.", tools=[get_weather], model=model,
                                           output_type=Weather, model_settings=settings)
                try:  # a call, then the answer
                    typed[name] = (await agents.Runner.run(typed_agent, "What is the weather in Paris?",
                                                           max_turns=2)).final_output
                    break
                except agents.MaxTurnsExceeded:
                    continue
        return plain, streamed, kinds, typed

    plain, streamed, kinds, typed = asyncio.run(run())
    assert isinstance(plain.final_output, str) and plain.final_output
    assert streamed.final_output == plain.final_output and "raw_response_event" in kinds
    assert [type(item).__name__ for item in plain.new_items][:2] == ["ToolCallItem", "ToolCallOutputItem"]
    assert calls and all(isinstance(c, str) for c in calls)
    assert set(typed) == {"responses", "chat"}
    assert all(isinstance(w, Weather) for w in typed.values())


def test_logprobs_of_the_output_text(smol_server, smollm):
    """With include=["message.output_text.logprobs"], each token's logprob and its top alternatives, as the model
    gives them run directly; the same in the stream's deltas."""
    tokenizer = smollm.tokenizer
    ids = tokenizer.encode(chatml([("system", "You are a helpful AI assistant named SmolLM, trained by Hugging "
                                              "Face"), ("user", "Name a fruit.")]), allow_special=True)
    ref_ids, rows = reference_greedy(smollm, ids, 6)
    request = dict(model=smol_server.model, input="Name a fruit.", max_output_tokens=6, temperature=0,
                   include=["message.output_text.logprobs"], top_logprobs=2)
    r = smol_server.client().responses.create(**request)
    logprobs = r.output[0].content[0].logprobs
    assert [lp.token for lp in logprobs] == [tokenizer.decode([t]) for t in ref_ids]
    for lp, token, row in zip(logprobs, ref_ids, rows[len(ids) - 1:]):
        assert lp.logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=2e-3)
        assert lp.bytes == list(tokenizer.decode_bytes([token]))
    events = events_of(smol_server, **request)
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert [lp["token"] for lp in streamed] == [lp.token for lp in logprobs]


def test_limits_and_deadlines_apply(tiny_llama3):
    from tests.server.conftest import live_server, TINY_NAME
    from server.openai.limits import Limits

    with live_server(tiny_llama3, TINY_NAME, max_model_len=256, max_num_seqs=2, max_num_batched_tokens=64) as s, \
            s.http() as http:
        s.state.config.limits = Limits(max_tokens=8, messages=2)
        body = {"model": TINY_NAME, "input": "Hi"}
        assert_openai_error(http.post("/v1/responses", json={**body, "max_output_tokens": 9}), 400,
                            param="max_output_tokens")
        items = [{"role": "user", "content": "a"}] * 3
        assert_openai_error(http.post("/v1/responses", json={**body, "input": items}), 400, param="input")
        late = http.post("/v1/responses", json={**body, "max_output_tokens": 8}, headers={"X-Request-Timeout": "1e-9"})
        assert_openai_error(late, 408, code="request_timeout")
        s.wait_until_idle()


@pytest.mark.parametrize("field, value", [("conversation", "conv_1"), ("prompt", {"id": "pmpt_1"}),
                                          ("reasoning", {"effort": "low"})])
def test_fields_this_server_does_not_serve_are_refused_not_ignored(tiny_server, field, value):
    with tiny_server.http() as http:
        r = http.post("/v1/responses", json={"model": tiny_server.model, "input": "Hi", field: value})
    assert_openai_error(r, 400, param=field)


def test_truncation_auto_drops_the_oldest_items_until_the_rest_fits(tiny_server):
    long_turns = [{"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "word " * 1200}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "Hi"}]  # about 2,400 tokens: twice that is more than 4,096
    body = {"model": tiny_server.model, "input": long_turns * 2, "max_output_tokens": 2}
    with tiny_server.http() as http:
        assert_openai_error(http.post("/v1/responses", json=body), 400, param="input", code="context_length_exceeded")
        r = http.post("/v1/responses", json={**body, "truncation": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["truncation"] == "auto" and r.json()["usage"]["input_tokens"] < 4096
