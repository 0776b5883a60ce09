"""`python -m server`: a config preset and flags → the engine → uvicorn.

Flags override the preset given with --config; the preset overrides the built-in defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import fields
from pathlib import Path

import yaml

from server.config import EngineConfig
from server.limits import Limits

log = logging.getLogger("server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "LLAMA3_SERVER_API_KEY"

SERVER_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "served_model_name": None, "api_key": None,
                   "api_key_file": None, "metrics_public": False, "allowed_origins": None, "limit": None, "log_requests": False,
                   "log_level": "info", "shutdown_grace_seconds": 30.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="OpenAI-compatible server for Llama 3 models")
    p.add_argument("--config", help="a YAML preset (e.g. configs/smollm2-cpu.yaml); flags override it")
    p.add_argument("--model", help="a .gguf file, a Hugging Face model directory or a Hub repo id "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the model id clients use (default: derived from --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="activations, dense weights and KV cache (default bfloat16; float32 for exact parity)")
    p.add_argument("--quantization", choices=["auto", "none", "int4", "int8"],
                   help="auto (default): a GGUF's Q4_0/Q4_1/Q8_0 tensors stay packed on CPU; none: dense weights; "
                   "int4, int8: also quantise float weights at load (CPU; the output head to 8 bits at most)")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run the decode step eagerly instead of compiling it")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--max-model-len", type=int, help="tokens per sequence, prompt and output (default 2048); a "
                   "limit, not a reservation: the KV cache is sized by --kv-cache-memory")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoding at once (default 32)")
    p.add_argument("--kv-cache-memory", help="memory for the KV cache, e.g. 1GiB or 512MiB (default: room for "
                   "--max-num-seqs sequences at --max-model-len, at most 4GiB; on CUDA see "
                   "--gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="on CUDA without --kv-cache-memory: the fraction of the device's memory this server may use, "
                   "weights and activations included; the KV cache gets what is left after loading the weights "
                   "and a warm-up pass (as vLLM; default 0.9)")
    p.add_argument("--block-size", type=int, help="tokens per KV cache block (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens per forward pass (default 512)")
    p.add_argument("--max-waiting", type=int, help="queued sequences before requests get 503 (default 512)")
    p.add_argument("--max-waiting-tokens", type=int,
                   help="queued prompt tokens before requests get 503 (default 262144)")
    p.add_argument("--request-timeout", type=float,
                   help="seconds a request may take from arrival to its last token, queue and prefill included; "
                   "a request can set its own with the X-Request-Timeout header (default: no limit)")
    p.add_argument("--seed", type=int, help="seed for requests that give none (default 0)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="map a new prompt's leading full blocks onto cached ones (default on)")
    p.add_argument("--api-key", help=f"require this bearer key on every route but /health (or set {API_KEY_ENV})")
    p.add_argument("--api-key-file", help="a file of accepted keys, one a line (blank lines and # comments "
                   "skipped), with or instead of --api-key")
    p.add_argument("--metrics-public", action="store_true", default=None,
                   help="serve /metrics without a key even when keys are required")
    p.add_argument("--log-requests", action="store_true", default=None,
                   help="log each request's prompt and output text (off by default: only ids, counts, timings)")
    p.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="lower a per-request limit (repeatable): body_bytes, n, max_tokens, stop, stop_length, "
                   "logit_bias, prompts, messages")
    p.add_argument("--allowed-origins", help="comma-separated origins browsers may call the API from (CORS); "
                   "none by default")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(default info)")
    p.add_argument("--shutdown-grace-seconds", type=float,
                   help="on SIGTERM, how long running requests may take to finish (default 30)")
    return p


def resolve_settings(argv: list[str] | None = None) -> tuple[EngineConfig, dict]:
    args = build_parser().parse_args(argv)
    preset: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"config file {path} does not exist")
        preset = yaml.safe_load(path.read_text()) or {}
        if not isinstance(preset, dict):
            raise SystemExit(f"config file {path} must be a mapping of option names to values")
        preset = {k.replace("-", "_"): v for k, v in preset.items()}
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    merged = {**preset, **flags}
    engine_keys = {f.name for f in fields(EngineConfig)}
    unknown = set(merged) - engine_keys - set(SERVER_DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown option(s) in {args.config}: {', '.join(sorted(unknown))}")
    engine = EngineConfig(**{k: v for k, v in merged.items() if k in engine_keys})
    server = {k: merged.get(k, default) for k, default in SERVER_DEFAULTS.items()}
    server["api_key"] = server["api_key"] or os.environ.get(API_KEY_ENV) or None
    server["api_keys"] = read_key_file(server.pop("api_key_file"))
    try:
        server["limits"] = Limits.parse(server.pop("limit"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    origins = server["allowed_origins"]
    server["allowed_origins"] = tuple(o.strip() for o in (origins.split(",") if isinstance(origins, str)
                                                          else origins or ()) if o.strip())
    if server["served_model_name"] is None:
        server["served_model_name"] = engine.model.rstrip("/") if engine.model else DEFAULT_MODEL_NAME
    return engine, server


def read_key_file(path: str | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"cannot read the API key file {path}: {e.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise SystemExit(f"the API key file {path} holds no keys")
    return keys


def build_engine(config: EngineConfig):
    import torch

    from model.loading import load
    from server.async_engine import AsyncEngine
    from server.engine import LLMEngine

    torch.manual_seed(config.seed)
    loaded = load(config.model, device=config.device, dtype=config.torch_dtype, max_seq_len=config.max_model_len,
                  quantization=config.quantization)
    log.info("loaded %s (%.0fM parameters, %s on %s, quantization %s) in %.2f s", loaded.source,
             loaded.config.num_params / 1e6, config.torch_dtype, config.device, loaded.quantization,
             loaded.load_seconds)
    return AsyncEngine(LLMEngine(loaded, config))  # the runner logs the KV cache's size


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from server.api import ServerState, create_app

    engine_config, server = resolve_settings(argv)
    from server.decode_step import use_persistent_compile_cache

    use_persistent_compile_cache()
    logging.basicConfig(level=server["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState(server["served_model_name"], api_key=server["api_key"], api_keys=server["api_keys"],
                        metrics_public=bool(server["metrics_public"]), allowed_origins=server["allowed_origins"],
                        limits=server["limits"], log_requests=bool(server["log_requests"]))
    app = create_app(state, lambda: build_engine(engine_config))
    log.info("serving %s on http://%s:%d", server["served_model_name"], server["host"], server["port"])
    config = uvicorn.Config(app, host=server["host"], port=server["port"], log_level=server["log_level"],
                            timeout_graceful_shutdown=server["shutdown_grace_seconds"])
    try:
        draining_server()(config, state, server["shutdown_grace_seconds"]).run()
    except KeyboardInterrupt:  # Ctrl-C after uvicorn's own graceful shutdown: nothing left to report
        pass


def draining_server():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM: new requests get 503 with Retry-After (and /health 503, so a load balancer stops sending),
        running requests finish for up to the grace period, then uvicorn shuts down and the process exits 0.
        SIGINT (Ctrl-C) stops at once, as uvicorn does."""

        def __init__(self, config, state, grace: float):
            super().__init__(config)
            self.state, self.grace = state, grace

        def handle_exit(self, sig, frame) -> None:
            if sig != signal.SIGTERM or self.state.draining:
                self.should_exit = True  # nothing re-raised afterwards: a finished shutdown is a clean exit
                if sig == signal.SIGINT and self.state.draining:
                    self.force_exit = True
                return
            self.state.draining = True
            log.info("SIGTERM: refusing new requests, letting running ones finish (up to %.0f s)", self.grace)
            threading.Thread(target=self._drain, name="drain", daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + self.grace
            engine = self.state.engine
            while engine is not None and time.monotonic() < deadline:
                stats = engine.stats()
                if stats.running == 0 and stats.waiting == 0:
                    break
                time.sleep(0.05)
            self.should_exit = True  # uvicorn's own graceful shutdown then flushes the open responses

    return DrainingServer


if __name__ == "__main__":
    main()
