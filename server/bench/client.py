"""`python -m server.bench`: load an OpenAI-compatible server with streamed requests and measure it.

    python -m server.bench --base-url http://127.0.0.1:8000 --num-prompts 64 --input-len 512 --output-len 128 \\
        --sweep-concurrency 1,4,16 --json results.json --plot results.png

Requests arrive as a Poisson process at --request-rate (default inf: all at once), at most --max-concurrency
in flight. From each SSE stream it takes the time to the first text chunk (TTFT), the gaps between text chunks
(ITL), the time per output token after the first (TPOT) and the end-to-end latency; output tokens are the
server's `usage` when it sends one, else one per text chunk. Failures (no server, HTTP errors, error events,
streams cut short) are counted with their messages, never raised. Any server that speaks the OpenAI API can be
measured, so two servers can be compared with the same client and workload. No torch, no model code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from server.bench.stats import Progress, RequestResult, format_summary, format_sweep, plot, summarize
from server.bench.workload import (Prompt, TokenizerUnavailable, dataset_prompts, find_tokenizer, local_tokenizer,
                                   random_prompts)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (a trailing /v1 is allowed)")
    p.add_argument("--model", help="the model id to request (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int_list, default=[64],
                   help="requests per run; with --sweep-concurrency one value, or one per level (N1,N2,...)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--sweep-concurrency", type=int_list, help="run once per level, e.g. 1,4,16,32")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf)")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens of random prompts")
    p.add_argument("--input-len-range", type=int, default=0, help="prompt lengths vary uniformly by +- this")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="leave out ignore_eos (an extension), so outputs may stop early")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dataset", help="a JSON-lines file of prompts ({'prompt': ...} or ShareGPT conversations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="requests sent and discarded before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--json", dest="json_path", help="write every figure and the configuration here")
    p.add_argument("--plot", help="draw latency and throughput against concurrency into this PNG")
    p.add_argument("--plot-from", nargs="+", metavar="JSON", help="only plot these earlier --json results")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def error_text(payload) -> str:
    """The message of an OpenAI-style {"error": {...}}, a flat {"message": ...} (vLLM) or {"detail": ...}."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)
        for key in ("message", "detail"):
            if payload.get(key):
                return str(payload[key])
        return str(error or payload)
    return str(payload)


def request_body(args: argparse.Namespace, model: str | None, prompt: Prompt) -> dict:
    body: dict = {"max_tokens": prompt.output_len, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return {**body, **args.extra_body}


async def send(client: httpx.AsyncClient, path: str, body: dict, prompt: Prompt, t0: float) -> RequestResult:
    """One streamed request, measured; every failure ends up in `result.error`."""
    result = RequestResult(prompt.prompt_len, prompt.output_len)
    start = time.perf_counter()
    result.start, last, finished, done = start - t0, start, False, False
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode("utf-8", errors="replace")
                try:
                    message = error_text(json.loads(raw))
                except ValueError:
                    message = raw.strip()[:300] or response.reason_phrase
                result.error = f"HTTP {response.status_code}: {message}"
                return result
            async for line in response.aiter_lines():
                field, _, data = line.partition(":")
                data = data.strip()
                if field == "error":  # llama.cpp's in-band errors
                    result.error = f"error event: {data}"
                    return result
                if field != "data" or not data:
                    continue
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if not isinstance(event, dict) or event.get("error") or event.get("object") == "error":
                    result.error = f"error event: {error_text(event)}"
                    return result
                now = time.perf_counter()
                usage = event.get("usage")
                if usage:
                    result.usage_prompt_tokens = usage.get("prompt_tokens")
                    result.usage_completion_tokens = usage.get("completion_tokens")
                for choice in event.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        result.num_chunks += 1
                    finished = finished or bool(choice.get("finish_reason"))
        if not (done or finished):
            result.error = "the stream ended before a finish_reason or [DONE]"
    except httpx.ConnectError as e:
        result.error = f"cannot connect to {client.base_url}: {e}"
    except httpx.TimeoutException as e:
        result.error = f"timed out ({type(e).__name__})"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    except json.JSONDecodeError as e:
        result.error = f"an event is not JSON: {e}"
    except Exception as e:  # a reply of some unexpected shape: a failed request, not a crashed benchmark
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.e2e = time.perf_counter() - start
    result.ok = result.error is None
    return result


async def run_level(client: httpx.AsyncClient, args: argparse.Namespace, model: str | None, prompts: list[Prompt],
                    concurrency: int | None, rng: random.Random, label: str) -> tuple[list[RequestResult], float]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    progress = Progress(len(prompts), label, args.progress)
    t0 = time.perf_counter()

    async def one(prompt: Prompt) -> RequestResult:
        if gate is None:
            result = await send(client, path, request_body(args, model, prompt), prompt, t0)
        else:
            async with gate:
                result = await send(client, path, request_body(args, model, prompt), prompt, t0)
        progress.update(result)
        return result

    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(args.request_rate):
            await asyncio.sleep(rng.expovariate(args.request_rate))
        tasks.append(asyncio.create_task(one(prompt)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - t0


async def first_model(client: httpx.AsyncClient) -> tuple[str | None, str | None]:
    """(the first model id of GET /v1/models, None) or (None, why not)."""
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"], None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        return None, f"{type(e).__name__}: {e}"


async def benchmark(args: argparse.Namespace, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Build the workload, run every level, print the tables; the report as --json writes it."""
    levels = args.sweep_concurrency or [args.max_concurrency]
    counts = args.num_prompts * len(levels) if len(args.num_prompts) == 1 else args.num_prompts
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # --max-concurrency gates requests
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/").removesuffix("/v1"), headers=headers,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0), limits=limits,
                                 transport=transport) as client:
        model, why = (args.model, None) if args.model else await first_model(client)
        if model is None:
            print(f"warning: cannot list the server's models ({why}); sending requests without a model",
                  file=sys.stderr)
        tokenizer = await find_tokenizer(client, model, args.endpoint == "chat")
        if not tokenizer.exact:
            print(f"warning: prompt token counts are approximate: {tokenizer.description}", file=sys.stderr)
        rng = random.Random(args.seed)
        needed = max(counts) + args.warmup
        print(f"building {needed} prompts; token counts: {tokenizer.description}", file=sys.stderr)

        async def build(tokenizer) -> list[Prompt]:
            if args.dataset:
                return await dataset_prompts(tokenizer, rng, args.dataset, needed, args.output_len)
            return await random_prompts(tokenizer, rng, needed, args.input_len, args.input_len_range, args.output_len)
        try:
            prompts = await build(tokenizer)
        except TokenizerUnavailable as e:  # the server stopped answering /tokenize part-way
            tokenizer = local_tokenizer(args.endpoint == "chat")
            print(f"warning: {e}; prompt token counts are approximate: {tokenizer.description}", file=sys.stderr)
            prompts = await build(tokenizer)
        lengths = [p.prompt_len for p in prompts]
        off = sum(p.target_len is not None and p.prompt_len != p.target_len for p in prompts)
        if off:
            print(f"warning: {off} of {len(prompts)} prompts miss the asked length (the closest found is used; "
                  f"a chat template can be longer than a short prompt)", file=sys.stderr)
        warmup, prompts = prompts[:args.warmup], prompts[args.warmup:]
        report = {"config": {**vars(args), "api_key": "***" if args.api_key else None,
                             "request_rate": str(args.request_rate), "model": model, "levels": levels,
                             "num_prompts": counts},
                  "prompts": {"count": len(lengths), "tokens_min": min(lengths), "tokens_max": max(lengths),
                              "tokens_mean": sum(lengths) / len(lengths), "off_target": off,
                              "counted_by": tokenizer.description, "exact": tokenizer.exact},
                  "client": {"python": platform.python_version(), "httpx": httpx.__version__},
                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": []}
        if warmup:
            results, _ = await run_level(client, args, model, warmup, max(levels) if None not in levels else None,
                                         random.Random(args.seed), "warmup")
            report["warmup"] = summarize(results, 1.0)["errors"] or "ok"
        for i, (level, count) in enumerate(zip(levels, counts)):
            label = f"concurrency {level or 'inf'}"
            results, duration = await run_level(client, args, model, prompts[:count], level,
                                                random.Random(args.seed + 1 + i), label)
            summary = summarize(results, duration)
            print(format_summary(summary, f"{label}, rate {args.request_rate} req/s"), flush=True)
            report["runs"].append({"max_concurrency": level, "request_rate": str(args.request_rate),
                                   "num_prompts": count, "summary": summary,
                                   "requests": [r.to_json() for r in results]})
    if len(levels) > 1:
        print(format_sweep(report["runs"]))
    return report


def main(argv: list[str] | None = None, transport: httpx.AsyncBaseTransport | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_from:
        if not args.plot:
            parser.error("--plot-from needs --plot FILE.png")
        plot([(Path(f).stem, json.loads(Path(f).read_text())) for f in args.plot_from], args.plot)
        return 0
    if args.max_concurrency is not None and args.sweep_concurrency:
        parser.error("give --max-concurrency or --sweep-concurrency, not both")
    if len(args.num_prompts) not in (1, len(args.sweep_concurrency or [None])):
        parser.error("--num-prompts takes one value, or one per --sweep-concurrency level")
    positive = (args.input_len, args.output_len, args.max_concurrency or 1)
    if min(positive) < 1 or min(args.input_len_range, args.warmup) < 0:
        parser.error("--input-len, --output-len and --max-concurrency must be positive, --input-len-range and "
                     "--warmup not negative")
    if not args.request_rate > 0:
        parser.error("--request-rate must be positive (inf: all at once)")
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-body must be a JSON object")
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        parser.error(f"the folder of --json {args.json_path} does not exist")
    try:
        report = asyncio.run(benchmark(args, transport))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(report, indent=1))
            print(f"results written to {args.json_path}")
    except (OSError, ValueError) as e:  # a dataset that cannot be read, a --json file that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        plot([(f"{report['config']['model']} @ {args.base_url}", report)], args.plot)
    return 0 if any(run["summary"]["completed"] for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
