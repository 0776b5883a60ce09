"""The routes: thin, each one a check of readiness and limits and a call into a serving object or the tokenizer."""

from __future__ import annotations

from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server import __version__
from server.engine.exceptions import ParamError
from server.openai.auth import Auth
from server.openai.chat_prompt import template_messages
from server.openai.errors import APIError, ClientDisconnected, to_api_error
from server.openai.openapi import STREAMABLE, error_responses, responses_streamable
from server.openai.protocol.chat import ChatCompletionRequest
from server.openai.protocol.completions import CompletionRequest
from server.openai.protocol.models import ModelCard, ModelList
from server.openai.protocol.responses import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest
from server.openai.protocol.tokenize import DetokenizeRequest, TokenizeChat, TokenizeRequest


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


def add_routes(app: FastAPI, state) -> None:
    """Every route of the API, over `state` (a `ServerState`)."""
    auth = Auth(state.config)
    authorized = [Depends(auth.authorize)]

    def check_limits(body) -> None:
        try:
            state.config.limits.check(body)
        except ParamError as e:
            raise to_api_error(e) from None

    async def generate(serving, body, raw: Request):
        state.ready()
        check_limits(body)
        try:
            return await serving.create(body, raw)
        except (APIError, ClientDisconnected):
            raise
        except Exception as e:  # engine refusals and parameter errors become OpenAI errors
            raise to_api_error(e) from None

    generating = STREAMABLE | error_responses(400, 401, 404, 408, 413, 500, 503)

    @app.get("/health", response_model=HealthResponse, responses=error_responses(503))
    async def health():
        engine = state.ready()
        if not engine.healthy:
            raise APIError(503, "the engine is failing: its last steps all failed, or its thread has stopped",
                           type="server_error", code="engine_unhealthy")
        return HealthResponse()

    @app.get("/version", dependencies=authorized, responses=error_responses(401))
    async def version():
        return {"version": __version__}

    @app.get("/metrics", dependencies=[Depends(auth.authorize_metrics)], response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}, **error_responses(401)})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card() -> ModelCard:
        max_len = state.engine.max_model_len if state.engine else None
        return ModelCard(id=state.config.served_model_name, created=state.created, max_model_len=max_len)

    @app.get("/v1/models", dependencies=authorized, responses=error_responses(401))
    async def list_models():
        return ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=authorized, responses=error_responses(401, 404))
    async def get_model(model_id: str):
        if model_id != state.config.served_model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return card().model_dump()

    @app.post("/v1/completions", dependencies=authorized, responses=generating)
    async def completions(body: CompletionRequest, raw: Request):
        return await generate(state.completions, body, raw)

    @app.post("/v1/chat/completions", dependencies=authorized, responses=generating)
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await generate(state.chat, body, raw)

    @app.post("/v1/responses", dependencies=authorized,
              responses=responses_streamable() | error_responses(400, 401, 404, 408, 413, 500, 503))
    async def create_response(body: ResponsesRequest, raw: Request):
        return await generate(state.responses, body, raw)

    def stored(response_id: str):
        state.ready()
        entry = state.responses.store.get(response_id)
        if entry is None:
            raise APIError(404, f"no stored response has the id {response_id!r}", param="response_id",
                           code="response_not_found")
        return entry

    @app.get("/v1/responses/{response_id}", dependencies=authorized, response_model=ResponseObject,
             responses=error_responses(401, 404, 503))
    async def get_response(response_id: str):
        return stored(response_id).response

    @app.delete("/v1/responses/{response_id}", dependencies=authorized, response_model=DeletedResponse,
                responses=error_responses(401, 404, 503))
    async def delete_response(response_id: str):
        stored(response_id)
        state.responses.store.delete(response_id)
        return DeletedResponse(id=response_id)

    @app.get("/v1/responses/{response_id}/input_items", dependencies=authorized, response_model=InputItemList,
             responses=error_responses(400, 401, 404, 503))
    async def list_input_items(response_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                               order: Literal["asc", "desc"] = "desc"):
        items = stored(response_id).input_items
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(400, f"no input item of this response has the id {after!r}", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)

    @app.post("/tokenize", dependencies=authorized, responses=error_responses(400, 401, 404, 413, 503))
    async def tokenize(body: TokenizeRequest):
        engine = state.ready()
        state.completions.check_model(body.model)
        if isinstance(body, TokenizeChat):  # the prompt chat completions would run, tools aside
            ids = state.chat.prompt.ids(template_messages(body.messages), body.add_generation_prompt)
        elif body.add_special_tokens:
            ids = engine.tokenizer.encode_prompt(body.prompt)
        else:
            ids = engine.tokenizer.encode(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=authorized, responses=error_responses(400, 401, 404, 413, 503))
    async def detokenize(body: DetokenizeRequest):
        engine = state.ready()
        state.completions.check_model(body.model)
        tokenizer = engine.tokenizer
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

