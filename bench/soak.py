"""Soak: mixed traffic for a long time, a quarter of the clients walking away mid-request; nothing may be lost.

    python bench/soak.py --base-url http://127.0.0.1:8000 [--minutes 30] [--clients 32] [--pid SERVER_PID]

Each client sends, one after another, random requests: completions or chat, streamed or not, n of 1 or 2, some
with stop strings, some with logprobs. A quarter of the clients (the "leavers") abandon each request at a random
moment. Printed: requests completed, failed among clients that stayed (must be 0), abandoned, the server's
running requests and KV cache use once traffic stops (must be 0), the server's resident memory after the first
minute and at the end (`--pid`; growth must stay under 5%), and latency percentiles minute by minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    abandoned: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)  # minute -> seconds


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def random_request(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.8]),
                  "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(["\n", ".", " the"])]
    if rng.random() < 0.5:
        path = "/v1/completions"
        body["prompt"] = rng.choice(["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3,"])
        if rng.random() < 0.3:
            body["logprobs"] = 2
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": rng.choice(["Hi!", "Name three colours.", "Why is the sky blue?"])}]
        if rng.random() < 0.3:
            body["logprobs"], body["top_logprobs"] = True, 2
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return path, body


async def one_request(http: httpx.AsyncClient, path: str, body: dict) -> str | None:
    """None when the response is complete and well formed, else what was wrong."""
    if not body["stream"]:
        r = await http.post(path, json=body)
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        choices = r.json()["choices"]
        return None if len(choices) == body["n"] and all(c["finish_reason"] for c in choices) else "bad body"
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"{r.status_code} {(await r.aread())[:200]!r}"
        finished, done = set(), False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return f"error event {event['error']}"
            finished |= {c["index"] for c in event["choices"] if c.get("finish_reason")}
        return None if done and len(finished) == body["n"] else f"stream ended early ({finished}, done={done})"


async def client(i: int, base_url: str, model: str, leaver: bool, until: float, start: float, tally: Tally,
                 max_tokens: int) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        while time.monotonic() < until:
            path, body = random_request(rng, model, max_tokens)
            began = time.monotonic()
            if leaver:
                try:
                    await asyncio.wait_for(one_request(http, path, body), timeout=rng.uniform(0.05, 2.0))
                    tally.completed += 1
                except asyncio.TimeoutError:
                    tally.abandoned += 1
                continue
            try:
                problem = await one_request(http, path, body)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            if problem is None:
                tally.completed += 1
                tally.latencies.setdefault(int((began - start) // 60), []).append(time.monotonic() - began)
            else:
                tally.failed += 1
                tally.failures.append(problem)


async def soak(base_url: str, model: str, seconds: float, clients: int, leavers: float = 0.25,
               max_tokens: int = 64) -> Tally:
    tally = Tally()
    start = time.monotonic()
    until = start + seconds
    n_leavers = round(clients * leavers)
    await asyncio.gather(*[client(i, base_url, model, i < n_leavers, until, start, tally, max_tokens)
                           for i in range(clients)])
    return tally


def scrape(base_url: str, names: tuple[str, ...]) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics").text
    out = {}
    for name in names:
        match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
        out[name] = float(match.group(1)) if match else float("nan")
    return out


def settle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """The server's running requests and KV cache use, once abandoned requests have been noticed and freed."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(base_url, names)
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p50 {pick(0.5):6.2f} s  p90 {pick(0.9):6.2f} s  p99 {pick(0.99):6.2f} s  ({len(values)} requests)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's only model")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pid", type=int, default=None, help="the server's process id, for its memory")
    args = parser.parse_args()
    model = args.model or httpx.get(f"{args.base_url}/v1/models").json()["data"][0]["id"]

    async def run() -> tuple[Tally, int | None]:
        task = asyncio.create_task(soak(args.base_url, model, args.minutes * 60, args.clients,
                                        max_tokens=args.max_tokens))
        rss_minute_one = None
        if args.pid is not None:
            await asyncio.sleep(min(60, args.minutes * 30))
            rss_minute_one = resident_bytes(args.pid)
        return await task, rss_minute_one

    tally, rss_one = asyncio.run(run())
    left = settle(args.base_url)
    print(f"{args.clients} clients ({round(args.clients * 0.25)} leaving mid-request) for {args.minutes:g} min")
    print(f"requests completed {tally.completed}, failed {tally.failed} (among clients that stayed), "
          f"abandoned {tally.abandoned}")
    for problem in tally.failures[:5]:
        print(f"  failure: {problem}")
    print("after the traffic: " + ", ".join(f"{k} {v:g}" for k, v in left.items()))
    if args.pid is not None:
        end = resident_bytes(args.pid)
        print(f"server resident memory: {rss_one / 2**20:.0f} MiB after the first minute, {end / 2**20:.0f} MiB at "
              f"the end ({(end / rss_one - 1) * 100:+.1f}%)")
    print("latency of completed requests (clients that stayed), minute by minute:")
    for minute in sorted(tally.latencies):
        print(f"  minute {minute + 1:>3}: {percentiles(tally.latencies[minute])}")


if __name__ == "__main__":
    main()
