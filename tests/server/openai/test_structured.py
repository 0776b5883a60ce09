"""Structured outputs and tool calls (server/structured.py): every constrained output checked with `jsonschema`
against the request's schema, through the official `openai` SDK on the real model, and the grammar engine's view
of the vocabulary checked against our tokenizer."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pydantic
import pytest

from server.engine import grammar
from server.engine.grammar import GrammarCompiler, token_bytes
from server.openai.constraints import json_object_spec
from server.openai.tool_calls import CALL_TRIGGER, ToolCallFormat, ToolCallScanner, parse_tool_calls
from tests.server.conftest import assert_openai_error

SCHEMAS = {
    "nested object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array with bounds": {"type": "object", "properties": {
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False},
    "enum and integer range": {"type": "object", "properties": {
        "size": {"enum": ["small", "medium", "large"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["size", "count"], "additionalProperties": False},
    "anyOf and optional field": {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 8}]},
        "note": {"type": "string", "maxLength": 10}},
        "required": ["id"], "additionalProperties": False},
    "number range and boolean": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 60}, "raining": {"type": "boolean"}},
        "required": ["temperature", "raining"], "additionalProperties": False},
    "string formats": {"type": "object", "properties": {
        "address": {"type": "string", "format": "ipv4"}, "day": {"type": "string", "format": "date"},
        "id": {"type": "string", "format": "uuid"}},
        "required": ["address", "day", "id"], "additionalProperties": False},
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def checker(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# -- the vocabulary as the grammar engine sees it -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm", "tiny_llama3"])
def test_grammar_engine_sees_exactly_our_token_bytes(which, request):
    loaded = request.getfixturevalue(which)
    tok, vocab_size = loaded.tokenizer, loaded.config.vocab_size
    compiler = GrammarCompiler(tok, vocab_size)
    seen = compiler.tokenizer_info.decoded_vocab
    assert len(seen) == vocab_size and compiler.tokenizer_info.vocab_size == vocab_size
    special = set(tok._token_of_added_id) | set(tok.special_token_ids) | set(tok.eos_token_ids)
    assert special, "the tokenizer has special tokens"
    for i in range(vocab_size):
        if i in special or not tok._is_token_id(i):
            assert seen[i] == b"", i
        else:
            assert seen[i] == tok.decode_bytes([i]), i
    assert sorted(compiler.tokenizer_info.stop_token_ids) == sorted(tok.eos_token_ids)
    # Inside constrained text no special token is allowed, stop tokens only where the grammar is complete.
    matcher = grammar.matcher(compiler.compile(json_object_spec("response_format")))
    assert matcher.accept_string('{"a": "')
    import xgrammar
    mask = xgrammar.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(mask, 0)
    words = mask[0].tolist()
    allowed = {i for i in range(vocab_size) if (words[i // 32] >> (i % 32)) & 1}
    assert allowed and not special & allowed
    assert tok.encode("abc")[0] in allowed
    assert token_bytes(tok, vocab_size)[1] == sorted(tok.eos_token_ids)


# -- JSON schemas through the SDK ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_validates_against_its_json_schema(smol_server, name):
    schema = SCHEMAS[name]
    client = smol_server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": f"Answer with JSON: an example of {name}."}]
    greedy = client.chat.completions.create(model=smol_server.model, messages=messages, response_format=fmt,
                                            max_tokens=150, temperature=0)
    sampled = client.chat.completions.create(model=smol_server.model, messages=messages, response_format=fmt,
                                             max_tokens=150, temperature=1.0, seed=7, n=2)
    for choice in greedy.choices + sampled.choices:
        assert choice.finish_reason == "stop", choice
        checker(schema).validate(json.loads(choice.message.content))
    stream = client.chat.completions.create(model=smol_server.model, messages=messages, response_format=fmt,
                                            max_tokens=150, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == greedy.choices[0].message.content  # streamed exactly as returned whole
    smol_server.wait_until_idle()


def test_json_object_mode_and_completions_endpoint(smol_server):
    client = smol_server.client()
    reply = client.chat.completions.create(model=smol_server.model, messages=[
        {"role": "user", "content": "Describe a cat as a JSON object."}], response_format={"type": "json_object"},
        max_tokens=200, temperature=0)
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: returned as it is, a prefix of an object, never repaired
        assert reply.choices[0].finish_reason == "length" and text.lstrip().startswith("{")
    schema = SCHEMAS["enum and integer range"]
    done = client.completions.create(model=smol_server.model, prompt="An order as JSON:", max_tokens=60,
                                     temperature=0, extra_body={"response_format": {
                                         "type": "json_schema", "json_schema": {"name": "o", "schema": schema}}})
    checker(schema).validate(json.loads(done.choices[0].text))
    choice = client.completions.create(model=smol_server.model, prompt="The sky is", max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["blue", "green", "red"]}})
    assert choice.choices[0].text in ("blue", "green", "red")
    regex = client.completions.create(model=smol_server.model, prompt="Call me at", max_tokens=20, temperature=0,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"
    ebnf = client.completions.create(model=smol_server.model, prompt="Say yes or no:", max_tokens=10,
                                     temperature=0, extra_body={"structured_outputs": {
                                         "grammar": 'root ::= "yes" | "no" | "maybe"'}})
    assert ebnf.choices[0].text in ("yes", "no", "maybe")


def test_sdk_parse_returns_a_pydantic_object(smol_server):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        population_millions: float

    client = smol_server.client()
    completion = client.beta.chat.completions.parse(
        model=smol_server.model, messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City, max_tokens=100, temperature=0)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name


# -- tool calls --------------------------------------------------------------------------------------------------

def _check_calls(message, tools):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in schemas
        checker(schemas[call.function.name]).validate(json.loads(call.function.arguments))


def test_tool_choice_required_named_and_auto(smol_server):
    client = smol_server.client()
    required = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=80, temperature=0)
    choice = required.choices[0]
    _check_calls(choice.message, [WEATHER, TIME])
    assert choice.message.content is None and choice.finish_reason == "tool_calls"

    named = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=80, temperature=0)
    _check_calls(named.choices[0].message, [TIME])
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]

    single = client.chat.completions.create(model=smol_server.model, messages=[
        {"role": "user", "content": "Weather and time in Paris and in Rome, please."}], tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert len(single.choices[0].message.tool_calls) == 1

    auto = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER], tool_choice="auto",
                                          max_tokens=60, temperature=0)
    message = auto.choices[0].message
    if message.tool_calls:  # the model chose to call: the call is constrained
        _check_calls(message, [WEATHER])
        assert auto.choices[0].finish_reason in ("tool_calls", "length")
    else:
        assert message.content and auto.choices[0].finish_reason in ("stop", "length")

    none = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content


def test_streamed_tool_call_is_reassembled_byte_for_byte(smol_server):
    client = smol_server.client()
    whole = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=80, temperature=0)
    fragments, first_deltas = {}, []
    for chunk in client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER],
                                                tool_choice="required", max_tokens=80, temperature=0, stream=True):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.id is not None:
                first_deltas.append(call)
            fragments[call.index] = fragments.get(call.index, "") + (call.function.arguments or "")
    assert [d.function.name for d in first_deltas] == [c.function.name for c in whole.choices[0].message.tool_calls]
    assert all(d.type == "function" and d.index == i for i, d in enumerate(first_deltas))
    assert [fragments[i] for i in sorted(fragments)] == [c.function.arguments
                                                         for c in whole.choices[0].message.tool_calls]
    # The SDK's own stream helper assembles the same call.
    with client.beta.chat.completions.stream(model=smol_server.model, messages=ASK, tools=[WEATHER],
                                             tool_choice="required", max_tokens=80, temperature=0) as stream:
        final = stream.get_final_completion()
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == \
        [c.function.arguments for c in whole.choices[0].message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"


def test_follow_up_turn_with_the_tool_result(smol_server):
    client = smol_server.client()
    first = client.chat.completions.create(model=smol_server.model, messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model=smol_server.model, messages=messages, tools=[WEATHER],
                                            max_tokens=40, temperature=0)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


# -- concurrency -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_constrained_and_unconstrained_requests_share_batches(smol_server):
    """16 at once, half constrained: every constrained output is valid, and each unconstrained greedy output is
    exactly what it is alone."""
    client, schema = smol_server.async_client(), SCHEMAS["enum and integer range"]
    prompts = [f"Write one short sentence about the number {i}." for i in range(8)]

    async def plain(prompt):
        r = await client.chat.completions.create(model=smol_server.model, messages=[
            {"role": "user", "content": prompt}], max_tokens=24, temperature=0)
        return r.choices[0].message.content

    async def constrained(i):
        r = await client.chat.completions.create(model=smol_server.model, messages=[
            {"role": "user", "content": f"Order {i} as JSON."}], max_tokens=60, temperature=0.8, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
        return r.choices[0]

    async def main():
        alone = [await plain(p) for p in prompts]
        mixed = await asyncio.gather(*[plain(p) for p in prompts], *[constrained(i) for i in range(8)])
        return alone, mixed

    alone, mixed = asyncio.run(main())
    assert mixed[:8] == alone
    for choice in mixed[8:]:
        assert choice.finish_reason == "stop"
        checker(schema).validate(json.loads(choice.message.content))
    smol_server.wait_until_idle()


# -- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a+"}}, "structured_outputs.regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"messages": [{"role": "tool", "content": "21 degrees"}]}, "messages.0.tool_call_id"),
])
def test_bad_schemas_and_tool_definitions_are_400s_naming_the_field(smol_server, body, param):
    payload = {"model": smol_server.model, "messages": ASK, "max_tokens": 5, **body}
    with smol_server.http() as http:
        response = http.post("/v1/chat/completions", json=payload)
    assert_openai_error(response, 400, param=param)
    smol_server.wait_until_idle()


# -- the tool-call scanner ----------------------------------------------------------------------------------------

def test_scanner_gives_the_same_calls_whatever_the_chunking():
    fmt = ToolCallFormat(("get_weather", "get_time"), auto=True, parallel=True)
    text = ('Let me check. ' + CALL_TRIGGER + '"get_weather", "parameters": {"city": "Pa\\"ris {", "n": [1, {}]}}'
            '\n' + CALL_TRIGGER + '"get_time", "parameters": {}}')
    content, calls = parse_tool_calls(text, fmt)
    assert content == "Let me check. "
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Pa\\"ris {", "n": [1, {}]}'),
                                                      ("get_time", "{}")]
    for size in (1, 2, 3, 7, 16):
        scanner = ToolCallScanner(fmt)
        events = []
        for i in range(0, len(text), size):
            events += scanner.feed(text[i:i + size], final=i + size >= len(text))
        streamed: dict[int, str] = {}
        for kind, value in events:
            if kind == "arguments":
                streamed[value[0]] = streamed.get(value[0], "") + value[1]
        assert [streamed.get(i, "") for i in range(2)] == [c.arguments for c in calls], size
        assert "".join(v for k, v in events if k == "content") == "Let me check. ", size
        assert [v[1].name for k, v in events if k == "call"] == ["get_weather", "get_time"], size


@pytest.mark.parametrize("conflict, words", [({"min_tokens": 5}, "allows no token"),
                                             ({"ignore_eos": True}, "ignore_eos cannot be combined")])
def test_a_grammar_that_allows_nothing_ends_the_request_with_a_clear_error(smol_server, conflict, words):
    """After "yes" the grammar allows only a stop token. min_tokens forbids it: no token is allowed, and the
    request fails with a 400 naming the constraint rather than a garbage token or a failed step. ignore_eos would
    run past the constraint's end: refused up front. The server keeps serving."""
    with smol_server.http() as http:
        response = http.post("/v1/completions", json={
            "model": smol_server.model, "prompt": "Answer:", "max_tokens": 10, "temperature": 0,
            "structured_outputs": {"choice": ["yes"]}, **conflict})
        error = assert_openai_error(response, 400, param="structured_outputs.choice", code="structured_output_error"
                                    if "min_tokens" in conflict else None)
        assert words in error["message"]
        ok = http.post("/v1/completions", json={"model": smol_server.model, "prompt": "Answer:", "max_tokens": 3,
                                                "structured_outputs": {"choice": ["yes"]}})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "yes"
    smol_server.wait_until_idle()


# -- tools together with an output format -----------------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"], "additionalProperties": False}


def test_one_grammar_allows_calls_or_the_format_and_nothing_else(smollm):
    """The grammar of tools with tool_choice "auto" and a JSON schema: a call, or content in the format; text that
    is neither is refused, token by token, by xgrammar's own matcher."""
    from server.openai.constraints import json_schema_spec
    from server.openai.tool_calls import output_grammar

    compiler = GrammarCompiler(smollm.tokenizer, smollm.config.vocab_size)
    spec, calls = output_grammar([WEATHER, TIME], "auto", True, json_schema_spec(CITY, "response_format"))
    assert calls.exclusive and spec.param == "response_format"
    compiled = compiler.compile(spec)
    eos = sorted(smollm.tokenizer.eos_token_ids)[0]

    def complete(text: str) -> bool:
        """The whole of `text`, then the end of the output, is allowed."""
        matcher = grammar.matcher(compiled)
        return matcher.accept_string(text) and matcher.accept_token(eos)

    call = '{"name": "get_time", "parameters": {"city": "Paris"}}'
    for text in (call, call + "\n" + '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}',
                 '{"city": "Paris", "country": "France"}'):
        assert complete(text), text
    for text in ('Sure! {"city": "Paris", "country": "France"}', '{"city": "Paris"}', '{"name": "Paris"}',
                 '{"name": "get_time", "parameters": {"town": "Paris"}}', call + ' {"city": "Paris"}'):
        assert not complete(text), text
    none_spec, none_calls = output_grammar([WEATHER], "none", True, json_schema_spec(CITY, "response_format"))
    assert none_calls is None and none_spec.kind == "json_schema"


def test_scanner_reads_format_content_that_looks_like_a_call_as_content():
    fmt = ToolCallFormat(("get_weather",), auto=True, parallel=True, exclusive=True)
    for text in ('{"name": "Paris", "country": "France"}', '{"city": "Paris"}'):
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        scanner = ToolCallScanner(fmt)
        events = [e for i, p in enumerate(pieces) for e in scanner.feed(p, final=i == len(pieces) - 1)]
        assert "".join(v for k, v in events if k == "content") == text and not scanner.calls
        assert parse_tool_calls(text, fmt) == (text, [])
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', fmt)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Rome"}')]


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required"])
def test_tools_with_a_response_format_in_chat_completions(smol_server, tool_choice):
    """OpenAI accepts both: the output is calls (per tool_choice) or content in the format, streamed or not."""
    client = smol_server.client()
    args = dict(model=smol_server.model, messages=[{"role": "user", "content": "Where is Paris? Answer as JSON."}],
                tools=[WEATHER], tool_choice=tool_choice, max_tokens=60, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}})
    full = client.chat.completions.create(**args)
    message = full.choices[0].message
    if message.tool_calls:
        assert tool_choice != "none" and full.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            checker(WEATHER["function"]["parameters"]).validate(json.loads(call.function.arguments))
    else:
        assert tool_choice != "required" and full.choices[0].finish_reason == "stop"
        checker(CITY).validate(json.loads(message.content))
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (message.content or "")
