"""Every error the engine raises or ends a request with; the HTTP layer maps each to a status (server/openai/errors.py)."""

from __future__ import annotations


class ParamError(ValueError):
    """An invalid request parameter; `param` names the field, as OpenAI's error body does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLong(ParamError):
    """The prompt leaves no room to generate within the context."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the server answers 503."""


class DeadlineExceeded(RuntimeError):
    """A request ran past its deadline (--request-timeout or X-Request-Timeout); it ends with this error."""


class GrammarViolation(RuntimeError):
    """A constrained sequence reached a point where its grammar allows no token (min_tokens forbids the stop token
    it needs): the request ends with this error, which names the constraint's field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineDead(RuntimeError):
    """The engine's thread has stopped: nothing more can be served."""
