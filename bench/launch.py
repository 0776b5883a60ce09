"""Waiting for, and stopping, a server that a bench script started: shared by the scripts that launch one."""

from __future__ import annotations

import subprocess
import time

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


def stop(server: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within `grace` seconds."""
    server.terminate()
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
