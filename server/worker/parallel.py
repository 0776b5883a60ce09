"""Tensor parallelism's processes: rank 0 is the server, the engine and one worker; ranks 1..N-1 are workers that
load their shard of the weights (model/parallel.py), hold their part of the KV cache and run every step's batch
with rank 0. The scheduler, the sampler and everything above them run on rank 0 only.

One host: rank 0 starts the others (`torch.multiprocessing`, spawn) and they meet on a local TCP port. Several
hosts: every rank is started by torchrun (or a LeaderWorkerSet), which sets MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE and LOCAL_RANK; rank 0 serves HTTP and the others run `worker_main`. gloo on CPU, NCCL on CUDA.

Each step, rank 0 broadcasts the step's chunks (one pickled message); each rank then runs the same forward pass,
whose collectives keep them in step. When idle, rank 0 broadcasts a heartbeat every few seconds, so that a worker
waiting for work never reaches the process group's timeout and a lost worker is noticed before the next request.

Faults: a worker that exits (for whatever reason, a failed start included), a step that does not finish within
STEP_TIMEOUT, or a collective that fails makes `TensorParallel.fail` report once to the server, which answers
/health with 503 and exits non-zero, naming the rank where it knows it. A worker whose rank 0 is gone sees its
collectives fail and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from model.parallel import Shard
from server.engine.config import EngineConfig

log = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(minutes=30)  # any one collective, start-up's included (ranks load at their own pace)
# seconds a step may take before rank 0 declares a rank hung (the environment variable: for tests)
STEP_TIMEOUT = float(os.environ.get("LLAMA3_TP_STEP_TIMEOUT", "120"))
HEARTBEAT_SECONDS = 5.0                # rank 0's message to idle workers
WATCH_SECONDS = 0.25


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_device(device: str, local_rank: int) -> str:
    """The device of the rank with this local rank: one CUDA device each, in order; every rank on the CPU."""
    if torch.device(device).type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"tensor-parallel rank {local_rank} needs CUDA device {local_rank}, but this host has "
                         f"{count}")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def _share_cpu(world: int) -> None:
    """N ranks on one host's CPUs: each gets its share of the cores (torch's and the C kernels' OpenMP threads)."""
    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the C kernels' OpenMP when they load
    torch.set_num_threads(threads)


def _init_group(config: EngineConfig, rank: int, world: int, init_method: str) -> None:
    backend = "nccl" if torch.device(config.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)


class TensorParallel:
    """Rank 0's side: starts the local workers, broadcasts the steps, watches for faults."""

    def __init__(self, config: EngineConfig, on_fatal: Callable[[str], None] | None = None):
        self.world = config.tensor_parallel_size
        self.shard = Shard(0, self.world)
        self._on_fatal = on_fatal
        self._failed = threading.Event()
        self.failure: str | None = None
        self._processes: dict[int, object] = {}
        self._step_started: float | None = None
        self._last_message = time.monotonic()
        if launched_by_torchrun():
            if int(os.environ["RANK"]) != 0:
                raise ValueError("only rank 0 serves; the other ranks run server.worker.parallel.worker_main")
            init_method = "env://"
            rank_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))  # this process's CUDA device
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            if torch.device(config.device).type == "cpu":
                _share_cpu(self.world)
            else:
                rank_device(config.device, self.world - 1)  # every device exists, or a clear error now
            rank_device(config.device, 0)
            context = torch.multiprocessing.get_context("spawn")
            for rank in range(1, self.world):
                process = context.Process(target=worker_main, args=(rank, self.world, init_method, config, rank),
                                          name=f"tp-rank-{rank}", daemon=True)
                process.start()
                self._processes[rank] = process
        _init_group(config, 0, self.world, init_method)
        log.info("tensor parallelism: rank 0 of %d (%s)", self.world, dist.get_backend())

    def watch(self) -> None:
        """Start watching for faults, once every rank has started (a failure to start is the loader's error:
        `start_failure`)."""
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    def start_failure(self, error: Exception) -> Exception:
        """The error to report when rank 0 failed to start: its own when it is about the flags or the model
        (every rank fails alike), else a worker's exit where one exited (a collective failed because of it)."""
        if isinstance(error, (ValueError, OSError)):
            return error
        lost = self._lost_worker(wait=1.0)
        return RuntimeError(f"{lost} while starting (its log says why)") if lost else error

    # --- steps -------------------------------------------------------------------------------------------------
    def begin_step(self, chunks: list) -> None:
        """Send the step's chunks to every rank; the forward pass that follows must run on all of them."""
        self._step_started = time.monotonic()  # a broadcast waits for its receivers too
        self._send(("step", chunks))

    def end_step(self) -> None:
        self._step_started = None

    def heartbeat(self) -> None:
        """Called by the idle engine: a message every HEARTBEAT_SECONDS at most."""
        if time.monotonic() - self._last_message >= HEARTBEAT_SECONDS and not self._failed.is_set():
            self._step_started = time.monotonic()
            try:
                self._send(("ping",))
            except Exception as e:  # noqa: BLE001 - a lost rank: reported, the server exits
                self.fail(f"a tensor-parallel worker is unreachable ({type(e).__name__}: {e})")
            self._step_started = None

    def close(self) -> None:
        """Stop the workers (they exit 0), from the engine's thread."""
        if not self._failed.is_set():
            try:
                self._send(("stop",))
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        self._failed.set()  # the watchdog's exits are expected from now on
        for process in self._processes.values():
            process.join(10)
            if process.is_alive():
                process.terminate()

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0)
        self._last_message = time.monotonic()

    # --- faults ------------------------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """Report a fault once: the group is unusable from here on."""
        if self._failed.is_set():
            return
        self._failed.set()
        # A collective fails as soon as a peer's sockets close, usually before the watchdog sees the exit: name
        # the rank that died where one did.
        self.failure = message = self._lost_worker(wait=1.0) or message
        log.critical("%s", message)
        # The group is unusable: stop the local workers, so that a collective rank 0 waits in fails now (and the
        # running requests with it) rather than at the group's timeout.
        for process in self._processes.values():
            process.kill()
        if self._on_fatal is not None:
            self._on_fatal(message)
        else:
            os._exit(1)

    def _lost_worker(self, wait: float = 0.0) -> str | None:
        """Which local worker has exited, if one has (waiting up to `wait` seconds for one to)."""
        deadline = time.monotonic() + wait
        while self._processes and time.monotonic() < deadline and not any(
                p.exitcode is not None for p in self._processes.values()):
            time.sleep(0.05)
        for rank, process in self._processes.items():
            code = process.exitcode
            if code is not None:
                return (f"tensor-parallel worker rank {rank} " +
                        (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"))
        return None

    def _watch(self) -> None:
        while not self._failed.is_set():
            lost = self._lost_worker()
            if lost is not None:
                self.fail(lost)
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > STEP_TIMEOUT:
                self.fail(f"a tensor-parallel step has not finished within {STEP_TIMEOUT:g} s: a rank is hung")
                return
            time.sleep(WATCH_SECONDS)


def worker_main(rank: int, world: int, init_method: str, config: EngineConfig, local_rank: int) -> None:
    """Rank `rank` of `world`: join the group, load this rank's shard, build its runner, run steps until rank 0
    says stop (exit 0) or the group fails (exit 1)."""
    from model.loading import load
    from server.worker.runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    logging.basicConfig(level=os.environ.get("LLAMA3_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if torch.device(config.device).type == "cpu" and not launched_by_torchrun():
        _share_cpu(world)
    config = dataclasses.replace(config, device=rank_device(config.device, local_rank))
    _init_group(config, rank, world, init_method)
    try:
        loaded = load(config.model, device=config.device, dtype=config.torch_dtype,
                      max_seq_len=config.max_model_len, quantization=config.quantization, shard=Shard(rank, world))
        runner = ModelRunner.from_config(loaded.model, config, parallel=None, shard=Shard(rank, world))
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            kind = message[0][0]
            if kind == "stop":
                break
            if kind == "step":
                runner.forward(message[0][1])
    except Exception:
        log.exception("tensor-parallel worker rank %d failed", rank)
        os._exit(1)  # not through the interpreter's exit: a collective may still be waiting on another thread
    dist.destroy_process_group()


def torchrun_worker(config: EngineConfig) -> None:
    """A rank > 0 started by torchrun (`python -m server ...` on every host)."""
    worker_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", config,
                int(os.environ.get("LOCAL_RANK", "0")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
