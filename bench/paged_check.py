"""The paged KV cache on CPU against a real server process; prints figures.

1. `--max-model-len 8192 --kv-cache-memory 1GiB --max-num-seqs 64`: 64 concurrent requests of 200 prompt and
   64 output tokens (greedy) are all running at once (read from /metrics), and each output equals the output of
   the same request sent alone afterwards.
2. A 7,000-token prompt while 8 short requests stream: when it completes, and the longest pause the streams
   see meanwhile.

    python bench/paged_check.py [--port 8123] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

import httpx
from launch import wait_healthy


def prompt_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


async def complete(client: httpx.AsyncClient, ids: list[int], max_tokens: int) -> list[int]:
    r = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True, "logprobs": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["tokens"]


async def running_peak(client: httpx.AsyncClient, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running{"):
                peak = max(peak, int(float(line.rsplit(" ", 1)[1])))
        await asyncio.sleep(0.05)
    return peak


async def concurrent_equals_alone(url: str, n: int) -> None:
    rng = random.Random(0)
    prompts = [prompt_ids(rng, 200) for _ in range(n)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        stop = asyncio.Event()
        watcher = asyncio.create_task(running_peak(client, stop))
        start = time.perf_counter()
        together = await asyncio.gather(*(complete(client, p, 64) for p in prompts))
        elapsed = time.perf_counter() - start
        stop.set()
        peak = await watcher
        alone = [await complete(client, p, 64) for p in prompts]
    same = sum(a == b for a, b in zip(together, alone))
    print(f"{n} concurrent requests of 200 + 64 tokens: {elapsed:.1f} s ({n * 64 / elapsed:.1f} tok/s), "
          f"peak running {peak}, outputs equal to alone: {same}/{n}")


async def long_prompt_while_streaming(url: str) -> None:
    rng = random.Random(1)
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        done = asyncio.Event()

        async def stream(ids):
            body = {"prompt": ids, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
            last = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    now = time.perf_counter()
                    if last is not None and not done.is_set() and long_started.is_set():
                        gaps.append(now - last)
                    last = now

        long_started = asyncio.Event()
        streams = [asyncio.create_task(stream(prompt_ids(rng, 50))) for _ in range(8)]
        await asyncio.sleep(3)
        long_started.set()
        start = time.perf_counter()
        tokens = await complete(client, prompt_ids(rng, 7000), 16)
        took = time.perf_counter() - start
        done.set()
        await asyncio.gather(*streams)
    print(f"7,000-token prompt + 16 tokens: {took:.1f} s, {len(tokens)} tokens; 8 streams meanwhile: "
          f"{len(gaps)} events, longest pause {max(gaps) * 1000:.0f} ms, median {sorted(gaps)[len(gaps) // 2] * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="1GiB")
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "server", "--port", str(args.port), "--max-model-len", "8192",
           "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", "512"]
    print("server:", " ".join(cmd[1:]))
    server = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        wait_healthy(url, server, 900)
        asyncio.run(concurrent_equals_alone(url, args.concurrency))
        asyncio.run(long_prompt_while_streaming(url))
        text = httpx.get(f"{url}/metrics").text
        for name in ("vllm:cache_config_info", "llama3_server:kv_cache_blocks{", "llama3_server:num_preemptions_total"):
            print(next((line for line in text.splitlines() if line.startswith(name)), name + " (absent)"))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
