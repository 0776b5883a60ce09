"""Waiting for, and stopping, a server that a bench script started: shared by the scripts that launch one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Return once `url`/health answers 200; raise if the process exits first or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before becoming healthy")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not become healthy within {seconds:.0f} s")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def wait_compiled(log: Path, server: subprocess.Popen, seconds: float) -> None:
    """Return once a server that compiles its decode step in the background has finished (or given up), as its
    log (INFO level) says; at once for a server that compiled before serving, or never compiles."""
    deadline = time.monotonic() + seconds
    while "compiling the decode step in the background" in (text := log.read_text()):
        if "decode step compiled" in text or "decode step not compiled" in text:
            return
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} while compiling")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the decode step did not compile within {seconds:.0f} s")
        time.sleep(0.5)


def stop(server: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within `grace` seconds."""
    server.terminate()
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
