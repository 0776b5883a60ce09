"""The FastAPI app: routes, OpenAI-shaped errors, API-key auth, body limits, readiness and metrics."""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.async_engine import AsyncEngine
from server.errors import APIError, to_api_error
from server.limits import Limits, describe_limits
from server.metrics import Metrics
from server.sampling_params import ParamError
from server.chat_messages import MESSAGE_ROLES, template_messages
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                             TokenizeChat, TokenizeRequest, now)
from server.serving import ClientDisconnected
from server.serving_chat import ChatServing
from server.serving_completions import CompletionServing

log = logging.getLogger(__name__)
MAX_BODY_BYTES = Limits().body_bytes


@dataclass
class ServerState:
    served_model_name: str
    api_key: str | None = None            # one key; `api_keys` may hold more (from --api-key-file)
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False          # /metrics without a key even when keys are set
    allowed_origins: tuple[str, ...] = ()  # CORS: browsers on these origins may call the API; none by default
    limits: Limits = field(default_factory=Limits)
    log_requests: bool = False            # prompt and output text in the request log; never by default
    draining: bool = False                # shutting down: new requests get 503 with Retry-After
    engine: AsyncEngine | None = None
    completions: CompletionServing | None = None
    chat: ChatServing | None = None
    metrics: Metrics | None = None
    load_error: str | None = None
    created: int = field(default_factory=now)

    def __post_init__(self):
        self.metrics = Metrics(self.served_model_name, lambda: self.engine.stats() if self.engine else None)
        if self.engine is not None:
            self.set_engine(self.engine)

    def set_engine(self, engine: AsyncEngine) -> None:
        self.completions = CompletionServing(engine, self.served_model_name, self.metrics)
        self.chat = ChatServing(engine, self.served_model_name, self.metrics, self.completions.grammars)
        self.completions.log_requests = self.chat.log_requests = self.log_requests
        self.engine = engine

    def ready(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error",
                           code="shutting_down")
        if self.engine is None:
            reason = f"loading the model failed: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, reason, type="server_error", code="not_ready")
        return self.engine


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    error: ErrorDetail


ERROR_MEANINGS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
                  408: "the request ran past its deadline", 413: "request body too large",
                  500: "the model step failed", 503: "not ready, overloaded or shutting down (see Retry-After)"}


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


def error_responses(*statuses: int) -> dict:
    """OpenAPI entries for the error statuses a route may answer, all with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


# With "stream": true the 200 is a stream of server-sent events; each event's data is a chunk object as JSON,
# the last one "[DONE]" (OpenAPI before 3.2 has `schema` describe one event).
STREAMABLE = {200: {"description": "The response, or with stream set, its chunks as server-sent events",
                    "content": {"text/event-stream": {"schema": {
                        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}}}


class BodyLimit:
    """413 for a request body over `max_bytes`, whether its Content-Length says so or it arrives in chunks.

    Plain ASGI on purpose: Starlette's `@app.middleware("http")` hides a client's disconnect from
    `Request.is_disconnected()`, so an abandoned non-streaming request would run to its end.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await APIError(413, message).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, message)  # FastAPI passes it on from reading the body
            return event

        await self.app(scope, limited_receive, send)


def create_app(state: ServerState, load_engine: Callable[[], AsyncEngine] | None = None) -> FastAPI:
    """`load_engine`, if given, runs on a thread at start-up: the server answers /health with 503 meanwhile."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_engine is not None and state.engine is None:
            def loader():
                try:
                    state.set_engine(load_engine())
                    log.info("model loaded; ready")
                except Exception as e:
                    log.exception("loading the model failed")
                    state.load_error = f"{type(e).__name__}: {e}"
            threading.Thread(target=loader, name="model-loader", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="llama3-server", version=__version__, lifespan=lifespan)
    app.state.server = state
    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's document, with the served model's vocabulary as every token id's upper bound (once loaded)."""
        if app.openapi_schema is not None and (state.engine is None or app.openapi_schema.get("x-vocab-bound")):
            return app.openapi_schema
        app.openapi_schema = None
        schema = default_openapi()
        if state.engine is not None:
            vocab = state.engine.engine.model_config.vocab_size

            def bound(node):
                if isinstance(node, dict):
                    if node.get("x-token-id"):
                        node["maximum"] = vocab - 1
                    if node.get("x-token-id-key"):
                        node["pattern"] = f"^({below(vocab)})$"
                    for value in node.values():
                        bound(value)
                elif isinstance(node, list):
                    for value in node:
                        bound(value)

            bound(schema)
            schema["x-vocab-bound"] = True
        describe_limits(schema, state.limits)
        # The model ids GET /v1/models lists are the ones GET /v1/models/{model_id} knows (an OpenAPI link).
        one_model = schema["paths"]["/v1/models/{model_id}"]["get"]["operationId"]
        schema["paths"]["/v1/models"]["get"]["responses"]["200"]["links"] = {"GetModel": {
            "operationId": one_model, "parameters": {"model_id": "$response.body#/data/0/id"}}}
        return schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        # A value that fits no member of a union fails once per member, each location ending in the member's
        # type ("prompt.str", "prompt.list[int].1"); the field is what those locations have in common.
        # A message's role tag ("messages.0.tool.tool_call_id") is left out of the field's name; a missing or
        # unknown role is the role's fault.
        locs = [[str(p) for n, p in enumerate(e.get("loc", ()))
                 if p != "body" and not (p in MESSAGE_ROLES and n and isinstance(e["loc"][n - 1], int))]
                + (["role"] if e.get("type") in ("union_tag_invalid", "union_tag_not_found") else [])
                for e in errors] or [[]]
        loc = locs[0]
        for other in locs[1:]:
            if other[:1] == loc[:1]:
                loc = [a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(loc, other))]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = APIError(exc.status_code, str(exc.detail), type=kind).response()
        response.headers.update(exc.headers or {})  # a 405 keeps its Allow header
        return response

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, nothing to log

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        log.exception("unhandled error")
        return to_api_error(exc).response()

    app.add_middleware(BodyLimit, max_bytes=state.limits.body_bytes)

    if state.allowed_origins:  # a wildcard never goes with credentials
        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins),
                           allow_credentials="*" not in state.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Timeout"])

    keys = [k.encode() for k in (state.api_key, *state.api_keys) if k]

    def authorize(request: Request) -> None:
        if not keys:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Compared with every key, in constant time each, so the time taken tells nothing about any of them.
        matches = [secrets.compare_digest(token.encode(), key) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")

    def authorize_metrics(request: Request) -> None:
        if not state.metrics_public:
            authorize(request)

    def check_limits(body) -> None:
        try:
            state.limits.check(body)
        except ParamError as e:
            raise to_api_error(e) from None

    async def run(call):
        try:
            return await call
        except (APIError, ClientDisconnected):
            raise
        except Exception as e:  # engine refusals and parameter errors become OpenAI errors
            raise to_api_error(e) from None

    @app.get("/health", response_model=HealthResponse, responses=error_responses(503))
    async def health():
        engine = state.ready()
        if not engine.healthy:
            raise APIError(503, "the engine is failing: its last steps all failed, or its thread has stopped",
                           type="server_error", code="engine_unhealthy")
        return HealthResponse()

    @app.get("/version", dependencies=[Depends(authorize)], responses=error_responses(401))
    async def version():
        return {"version": __version__}

    @app.get("/metrics", dependencies=[Depends(authorize_metrics)], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **error_responses(401)})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card() -> ModelCard:
        max_len = state.engine.engine.max_model_len if state.engine else None
        return ModelCard(id=state.served_model_name, created=state.created, max_model_len=max_len)

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=error_responses(401))
    async def list_models():
        return ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)], responses=error_responses(401, 404))
    async def get_model(model_id: str):
        if model_id != state.served_model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return card().model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorize)],
              responses=STREAMABLE | error_responses(400, 401, 404, 408, 413, 500, 503))
    async def completions(body: CompletionRequest, raw: Request):
        state.ready()
        check_limits(body)
        return await run(state.completions.create(body, raw))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)],
              responses=STREAMABLE | error_responses(400, 401, 404, 408, 413, 500, 503))
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        state.ready()
        check_limits(body)
        return await run(state.chat.create(body, raw))

    @app.post("/tokenize", dependencies=[Depends(authorize)], responses=error_responses(400, 401, 404, 413, 503))
    async def tokenize(body: TokenizeRequest):
        state.ready()
        state.completions.check_model(body.model)
        tokenizer = state.completions.tokenizer
        if isinstance(body, TokenizeChat):
            ids = state.chat.prompt_ids(template_messages(body.messages), body.add_generation_prompt)
        elif body.add_special_tokens:
            ids = tokenizer.encode_prompt(body.prompt)
        else:
            ids = tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.engine.max_model_len}

    @app.post("/detokenize", dependencies=[Depends(authorize)], responses=error_responses(400, 401, 404, 413, 503))
    async def detokenize(body: DetokenizeRequest):
        state.ready()
        state.completions.check_model(body.model)
        tokenizer = state.completions.tokenizer
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app
