"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the right HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from server.async_engine import EngineDead
from server.engine import DeadlineExceeded, GrammarViolation, PromptTooLong
from server.sampling_params import ParamError
from server.scheduler import EngineOverloaded

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
