"""`python -m server`: the settings (server/cli.py) → the engine, loaded on a thread → uvicorn, with a draining
shutdown on SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from model.paths import use_persistent_compile_cache
from server.cli import resolve_settings
from server.engine.config import EngineConfig
from server.worker import COMPILE_THREAD

log = logging.getLogger("server")

FATAL_EXIT_SECONDS = 20.0


def build_engine(config: EngineConfig, on_fatal=None):
    """The engine, on rank 0 of a tensor-parallel group when the model is split (the group's faults go to
    `on_fatal`)."""
    from model.loading import load
    from model.parallel import Shard
    from server.engine.async_engine import AsyncEngine
    from server.engine.llm_engine import LLMEngine
    from server.worker.parallel import TensorParallel, launched_by_torchrun

    parallel = None
    if config.tensor_parallel_size > 1 or launched_by_torchrun():
        if launched_by_torchrun():
            config = dataclasses.replace(config, tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
        parallel = TensorParallel(config, on_fatal)
    try:
        loaded = load(config.model, device=config.device, dtype=config.torch_dtype, max_seq_len=config.max_model_len,
                      quantization=config.quantization, shard=parallel.shard if parallel else Shard())
        log.info("loaded %s (%.0fM parameters, %s on %s, quantization %s%s) in %.2f s", loaded.source,
                 loaded.config.num_params / 1e6, config.torch_dtype, config.device, loaded.quantization,
                 f", rank 0 of {parallel.world}" if parallel else "", loaded.load_seconds)
        engine = LLMEngine(loaded, config, parallel)  # the runner logs the KV cache's size
    except Exception as e:
        if parallel is None:
            raise
        raise parallel.start_failure(e) from e
    if parallel is not None:
        parallel.watch()
    return AsyncEngine(engine)


def main(argv: list[str] | None = None) -> None:
    use_persistent_compile_cache()  # first: importing the app imports Inductor
    import uvicorn

    from server.openai.app import ServerState, create_app

    engine_config, server = resolve_settings(argv)
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("LLAMA3_LOG_LEVEL", server.log_level.upper())  # for tensor-parallel workers
    from server.worker.parallel import launched_by_torchrun, torchrun_worker
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:  # a worker rank on some host: no HTTP
        torchrun_worker(engine_config)
        return
    state = ServerState(server)
    holder: list = []  # the uvicorn server, for the loader to stop when the model cannot be loaded

    def stop() -> None:
        holder[0].should_exit = True

    def fatal(message: str) -> None:
        """A fault the engine cannot recover from (a tensor-parallel rank lost): /health answers 503, the open
        requests fail, the process exits non-zero soon, and surely within FATAL_EXIT_SECONDS."""
        state.failure = message
        holder[0].config.timeout_graceful_shutdown = 1.0
        holder[0].should_exit = True
        threading.Timer(FATAL_EXIT_SECONDS, os._exit, (1,)).start()

    app = create_app(state, lambda: build_engine(engine_config, fatal), on_load_failure=stop)
    log.info("serving %s on http://%s:%d", server.served_model_name, server.host, server.port)
    config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level,
                            timeout_graceful_shutdown=server.shutdown_grace_seconds)
    holder.append(draining_server()(config, state, server.shutdown_grace_seconds))
    try:
        holder[0].run()
    except KeyboardInterrupt:  # Ctrl-C after uvicorn's own graceful shutdown: nothing left to report
        pass
    message = None
    if state.load_error is not None:  # a server that can never serve exits, so that its supervisor sees it
        message = f"cannot serve: {state.load_error}"
    elif state.failure is not None:
        message = f"cannot serve: {state.failure}"
    if any(t.name == COMPILE_THREAD and t.is_alive() for t in threading.enumerate()):
        # A decode step still compiling on its thread: finalising the interpreter under Inductor aborts (SIGABRT),
        # so the process ends here, its output flushed, with the exit status a finished shutdown would give.
        if message is not None:
            print(message, file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if message is None else 1)
    if message is not None:
        raise SystemExit(message)


def draining_server():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM: new requests get 503 with Retry-After (and /health 503, so a load balancer stops sending),
        running requests finish for up to the grace period, then uvicorn shuts down and the process exits 0: a
        request still running then is cut off, and the process is gone about a second after the grace period.
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
            # uvicorn's own graceful shutdown then flushes the open responses within what is left of the same grace
            # period (a second at least), so that SIGTERM to exit is one grace period, not two
            self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())
            self.should_exit = True

    return DrainingServer


if __name__ == "__main__":
    main()
