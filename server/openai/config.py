"""The HTTP server's settings: address, the served name, keys, CORS, per-request limits, logging and shutdown.

Options of `python -m server` like the engine's (server/engine/config.py), stated once here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.engine.config import option, parse_bytes
from server.openai.limits import Limits

API_KEY_ENV = "LLAMA3_SERVER_API_KEY"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port")
    served_model_name: str = option(DEFAULT_MODEL_NAME, "the model id clients use", shown="derived from --model")
    api_key: str | None = option(None, f"require this bearer key on every route but /health (or set {API_KEY_ENV})",
                                 shown="none")
    api_key_file: str | None = option(None, "a file of accepted keys, one a line (blank lines and # comments "
                                      "skipped), with or instead of --api-key", shown="none")
    metrics_public: bool = option(False, "serve /metrics without a key even when keys are required")
    allowed_origins: tuple[str, ...] | str = option(
        (), "comma-separated origins browsers may call the API from (CORS)", shown="none")
    limits: Limits | list[str] = option(
        None, "lower a per-request limit: " + ", ".join(Limits.names()), factory=Limits, flag="--limit",
        metavar="NAME=VALUE", repeat=True, shown="none lowered")
    log_requests: bool = option(False, "log each request's prompt and output text (otherwise only ids, counts and "
                                "timings)")
    log_level: str = option("info", "how much the server logs", choices=LOG_LEVELS)
    shutdown_grace_seconds: float = option(30.0, "on SIGTERM, how long running requests may take to finish")
    response_store_entries: int = option(1024, "responses the Responses API keeps for previous_response_id and "
                                         "retrieval, least recently used dropped first (0: keep none)")
    response_store_memory: int | str = option("256MiB", "memory those stored responses may take, as JSON")
    api_keys: tuple[str, ...] = field(init=False, default=())  # every accepted key: --api-key and the key file's

    def __post_init__(self):
        if isinstance(self.allowed_origins, str):
            self.allowed_origins = self.allowed_origins.split(",")
        self.allowed_origins = tuple(o.strip() for o in self.allowed_origins if o.strip())
        if not isinstance(self.limits, Limits):
            self.limits = Limits.parse(self.limits)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        self.response_store_memory = parse_bytes(self.response_store_memory)
        if self.response_store_entries < 0 or self.response_store_memory < 0:
            raise ValueError("the response store's bounds must not be negative")
        if not self.shutdown_grace_seconds >= 0:
            raise ValueError(f"shutdown_grace_seconds must not be negative, got {self.shutdown_grace_seconds}")
        self.api_keys = tuple(dict.fromkeys(([self.api_key] if self.api_key else []) + read_key_file(self.api_key_file)))


def read_key_file(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"the API key file {path} holds no keys")
    return keys
