"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the right HTTP status: what the
engine and request parsing raise mapped to a status, and the app's handlers for everything else."""

from __future__ import annotations

import itertools
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.exceptions import (DeadlineExceeded, EngineDead, EngineOverloaded, GrammarViolation, ParamError,
                                     PromptTooLong)
from server.openai.protocol.messages import MESSAGE_ROLES

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = "1"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """A non-streaming client went away: its requests are aborted and nobody is left to answer."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    error: ErrorDetail


def to_api_error(error: BaseException) -> APIError:
    """Map what the engine or the request parsing raised to the error a client gets."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, PromptTooLong):
        return APIError(400, str(error), param=error.param, code="context_length_exceeded")
    if isinstance(error, ParamError):
        return APIError(400, str(error), param=error.param)
    if isinstance(error, EngineOverloaded):
        return APIError(503, str(error), type="server_error", code="overloaded")
    if isinstance(error, DeadlineExceeded):
        return APIError(408, str(error), type="timeout_error", code="request_timeout")
    if isinstance(error, GrammarViolation):
        return APIError(400, str(error), param=error.param, code="structured_output_error")
    if isinstance(error, EngineDead):
        return APIError(503, str(error), type="server_error", code="engine_unavailable")
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error", code="internal_error")


# What pydantic writes into a location for a tagged union's member: the tag after a list index.
UNION_TAGS = frozenset(MESSAGE_ROLES) | {"message", "function_call", "function_call_output"}


def _member_name(part) -> bool:
    """A union member's type in a location ("str", "list[int]", "constrained-str"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part
                                      or part.startswith("constrained-"))


def _location(error: dict) -> list[str]:
    raw = [p for p in error.get("loc", ()) if p != "body"]
    loc = [str(p) for n, p in enumerate(raw)
           if not _member_name(p) and not (p in UNION_TAGS and n and isinstance(raw[n - 1], int))]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # a missing or unknown tag's fault
        tag = str((error.get("ctx") or {}).get("discriminator", ""))
        loc.append(tag.strip("'") if tag.startswith("'") else "type")
    return loc


def validation_error_param(errors: list[dict]) -> str | None:
    """The field a validation failure is about, as OpenAI names it. A value that fits no member of a union fails
    once per member, each location ending in the member's type ("prompt.str", "prompt.list[int].1"): the field is
    what those locations have in common, unless the value took a tagged member's form and failed inside it
    ("input.0.content"). A tagged member's tag ("messages.0.tool.tool_call_id") is left out of the field's name;
    a missing or unknown tag, or a `type` this server does not serve, is that field's fault."""
    def in_tagged_member(e: dict) -> bool:
        return any("tagged-union[" in str(p) for p in e.get("loc", ()))

    def plain(e: dict) -> bool:  # not inside any union member
        return not any(_member_name(p) for p in e.get("loc", ()))

    inside = [e for e in errors if in_tagged_member(e) and not str(e.get("type", "")).endswith("_type")]
    # An object of a kind this server does not serve ({"type": "web_search"}) is the fault of its type alone.
    wrong_kind = [e for e in errors if plain(e) and e.get("type") == "literal_error"
                  and e.get("loc", ())[-1:] == ("type",)]
    locs = [_location(e) for e in (wrong_kind or inside or errors)] or [[]]
    loc = locs[0]
    for other in locs[1:]:
        if other[:1] == loc[:1]:
            loc = [a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(loc, other))]
    return ".".join(loc) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = validation_error_param(errors)
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = APIError(exc.status_code, str(exc.detail), type=kind).response()
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            methods = {m for route in app.routes if getattr(route, "path_regex", None) is not None
                       and route.path_regex.match(request.url.path) for m in getattr(route, "methods", ()) or ()}
            response.headers["allow"] = ", ".join(sorted(methods - {"HEAD"}))
        return response

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, nothing to log

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        log.exception("unhandled error")
        return to_api_error(exc).response()
