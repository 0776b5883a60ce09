"""The OpenAPI document, as the server answers it: FastAPI's, with what a schema alone cannot know filled in (the
served model's vocabulary bounds every token id, the operator's limits bound the fields they limit), and the
error and event-stream responses each route declares."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import TypeAdapter

from server.openai.errors import ErrorResponse
from server.openai.limits import Limits
from server.openai.protocol.responses import ResponseEvent, ResponseObject

ERROR_MEANINGS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
                  408: "the request ran past its deadline", 413: "request body too large",
                  500: "the model step failed", 503: "not ready, overloaded or shutting down (see Retry-After)"}

# With "stream": true the 200 is a stream of server-sent events; each event's data is a chunk object as JSON,
# the last one "[DONE]" (OpenAPI before 3.2 has `schema` describe one event).
STREAMABLE = {200: {"description": "The response, or with stream set, its chunks as server-sent events",
                    "content": {"text/event-stream": {"schema": {
                        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}}}


def responses_streamable() -> dict:
    """POST /v1/responses: the response object, or with stream set, its typed events (the event schemas are added
    to the document's components by `install_openapi`)."""
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"$ref": "#/components/schemas/ResponseEvent"}}}}
    return {200: {"model": ResponseObject, "description": "The response, or with stream set, its events as "
                  "server-sent events (`event: TYPE`, `data: EVENT`)", "content": {"text/event-stream": {
                      "schema": event}}}}


def add_event_schemas(schema: dict) -> None:
    """The streamed events' schemas, as components (FastAPI documents only JSON bodies)."""
    events = TypeAdapter(ResponseEvent).json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(events.pop("$defs", {}))
    components["ResponseEvent"] = events


def error_responses(*statuses: int) -> dict:
    """OpenAPI entries for the error statuses a route may answer, all with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


def below(n: int) -> str:
    """A regular expression for the decimal numbers 0 .. n-1, without leading zeros (n >= 1): how a token id
    written as a JSON object key is bounded by the vocabulary."""
    top = str(n - 1)
    parts = ["0"] if n > 0 else []
    for length in range(1, len(top)):  # every number with fewer digits than n-1
        parts.append("[1-9]" + (f"[0-9]{{{length - 1}}}" if length > 1 else ""))
    for i, digit in enumerate(top):  # same length: equal to n-1 up to position i, then a smaller digit
        low = "1" if i == 0 else "0"
        if digit > low or (i == len(top) - 1 and digit >= low):
            hi = digit if i == len(top) - 1 else str(int(digit) - 1)
            if hi >= low:
                rest = len(top) - i - 1
                parts.append(top[:i] + f"[{low}-{hi}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "|".join(dict.fromkeys(p for p in parts if p != "[1-0]"))


def bound_token_ids(schema: dict, vocab_size: int) -> None:
    """Every token id (`x-token-id`) and token-id key (`x-token-id-key`) bounded by the vocabulary."""
    def bound(node):
        if isinstance(node, dict):
            if node.get("x-token-id"):
                node["maximum"] = vocab_size - 1
            if node.get("x-token-id-key"):
                node["pattern"] = f"^({below(vocab_size)})$"
            for value in node.values():
                bound(value)
        elif isinstance(node, list):
            for value in node:
                bound(value)

    bound(schema)


def describe_limits(schema: dict, limits: Limits) -> None:
    """State the limits in the request schemas, so that clients and fuzzers see them."""
    def branches(prop: dict) -> list[dict]:
        return prop.get("anyOf", [prop])

    def lower(node: dict, key: str, value: int) -> None:
        node[key] = min(node.get(key, value), value)

    for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
        props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
        for field, limit in (("n", limits.n), ("max_tokens", limits.max_tokens),
                             ("max_completion_tokens", limits.max_tokens), ("max_output_tokens", limits.max_tokens)):
            for branch in branches(props.get(field, {})):
                if branch.get("type") == "integer":
                    lower(branch, "maximum", limit)
        for branch in branches(props.get("stop", {})):
            if branch.get("type") == "string":
                lower(branch, "maxLength", limits.stop_length)
            elif branch.get("type") == "array":
                lower(branch, "maxItems", limits.stop)
                lower(branch["items"], "maxLength", limits.stop_length)
        for branch in branches(props.get("logit_bias", {})):
            if branch.get("type") == "object":
                lower(branch, "maxProperties", limits.logit_bias)
        for branch in branches(props.get("prompt", {})):
            if branch.get("type") == "array" and branch.get("items", {}).get("type") != "integer":
                lower(branch, "maxItems", limits.prompts)
        if "messages" in props:
            lower(props["messages"], "maxItems", limits.messages)
        for branch in branches(props.get("input", {})):
            if branch.get("type") == "array":
                lower(branch, "maxItems", limits.messages)


def install_openapi(app: FastAPI, state) -> None:
    """`app.openapi` answers FastAPI's document with the vocabulary (once the model is loaded) and the limits."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None and (state.engine is None or app.openapi_schema.get("x-vocab-bound")):
            return app.openapi_schema
        app.openapi_schema = None
        schema = default_openapi()
        if state.engine is not None:
            bound_token_ids(schema, state.engine.vocab_size)
            schema["x-vocab-bound"] = True
        describe_limits(schema, state.config.limits)
        add_event_schemas(schema)
        # The model ids GET /v1/models lists are the ones GET /v1/models/{model_id} knows (an OpenAPI link).
        one_model = schema["paths"]["/v1/models/{model_id}"]["get"]["operationId"]
        schema["paths"]["/v1/models"]["get"]["responses"]["200"]["links"] = {"GetModel": {
            "operationId": one_model, "parameters": {"model_id": "$response.body#/data/0/id"}}}
        # A created response's id is what its stored-response routes take.
        stored = "/v1/responses/{response_id}"
        schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["links"] = {
            name: {"operationId": schema["paths"][path][method]["operationId"],
                   "parameters": {"response_id": "$response.body#/id"}}
            for name, path, method in (("GetResponse", stored, "get"), ("DeleteResponse", stored, "delete"),
                                       ("ListInputItems", stored + "/input_items", "get"))}
        return schema

    app.openapi = openapi
