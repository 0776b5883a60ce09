"""The FastAPI app, assembled: the server's state, the model loading at start-up, middleware, error handlers,
routes and the OpenAPI document."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.engine.async_engine import AsyncEngine
from server.openai.config import ServerConfig
from server.openai.errors import APIError, install_error_handlers
from server.openai.metrics import Metrics
from server.openai.middleware import BodyLimit
from server.openai.openapi import install_openapi
from server.openai.protocol.common import now
from server.openai.routes import add_routes
from server.openai.serving.base import GrammarCompilers
from server.openai.serving.chat import ChatServing
from server.openai.serving.completions import CompletionServing
from server.openai.serving.responses import ResponsesServing
from server.openai.response_store import ResponseStore

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    config: ServerConfig = field(default_factory=ServerConfig)
    engine: AsyncEngine | None = None
    draining: bool = False                # shutting down: new requests get 503 with Retry-After
    load_error: str | None = None
    failure: str | None = None            # the engine cannot go on (a tensor-parallel rank lost): exiting
    created: int = field(default_factory=now)
    metrics: Metrics = field(init=False)
    completions: CompletionServing | None = field(init=False, default=None)
    chat: ChatServing | None = field(init=False, default=None)
    responses: ResponsesServing | None = field(init=False, default=None)

    def __post_init__(self):
        self.metrics = Metrics(self.config.served_model_name, lambda: self.engine.stats() if self.engine else None)
        if self.engine is not None:
            self.set_engine(self.engine)

    def set_engine(self, engine: AsyncEngine) -> None:
        grammars = GrammarCompilers(engine)  # one per server: both endpoints share its cache
        name, log_requests = self.config.served_model_name, self.config.log_requests
        self.completions = CompletionServing(engine, name, self.metrics, grammars, log_requests)
        self.chat = ChatServing(engine, name, self.metrics, grammars, log_requests)
        store = ResponseStore(self.config.response_store_entries, self.config.response_store_memory)
        self.responses = ResponsesServing(engine, name, self.metrics, grammars, log_requests, store=store)
        self.engine = engine

    def ready(self) -> AsyncEngine:
        if self.failure is not None:
            raise APIError(503, f"the engine failed: {self.failure}", type="server_error", code="engine_failed")
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error",
                           code="shutting_down")
        if self.engine is None:
            reason = f"loading the model failed: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, reason, type="server_error", code="not_ready")
        return self.engine


def create_app(state: ServerState, load_engine: Callable[[], AsyncEngine] | None = None,
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """`load_engine`, if given, runs on a thread at start-up: the server answers /health with 503 meanwhile. If it
    fails, `state.load_error` says why and `on_load_failure` is called (the command line exits non-zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_engine is not None and state.engine is None:
            def loader():
                try:
                    state.set_engine(load_engine())
                    log.info("model loaded; ready")
                except Exception as e:
                    log.debug("loading the model failed", exc_info=True)
                    state.load_error = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
                    log.error("loading the model failed: %s", state.load_error)
                    if on_load_failure is not None:
                        on_load_failure()
            threading.Thread(target=loader, name="model-loader", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="llama3-server", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=state.config.limits.body_bytes)
    origins = state.config.allowed_origins
    if origins:  # a wildcard never goes with credentials
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_credentials="*" not in origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Timeout"])
    add_routes(app, state)
    install_openapi(app, state)
    return app
