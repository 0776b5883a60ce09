"""Bearer-key authentication, as FastAPI dependencies: every route but /health (and /metrics when public)."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.openai.config import ServerConfig
from server.openai.errors import APIError


class Auth:
    def __init__(self, config: ServerConfig):
        self.keys = [k.encode() for k in config.api_keys]
        self.metrics_public = config.metrics_public

    def authorize(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared with every key, in constant time each, so the time taken tells nothing about any of them.
        matches = [secrets.compare_digest(token.encode(), key) for key in self.keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key")

    def authorize_metrics(self, request: Request) -> None:
        if not self.metrics_public:
            self.authorize(request)
