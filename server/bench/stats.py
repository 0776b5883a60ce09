"""Benchmark figures: what one streamed request measured, percentiles, a run's summary; progress, tables, plots.

Latencies are kept in seconds per request and reported in milliseconds. Percentiles interpolate linearly
between the two nearest ranks, as numpy's default does, so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    prompt_len: int                    # prompt tokens the workload expects the server to count
    output_len: int                    # max_tokens asked for
    ok: bool = False
    error: str | None = None
    start: float = 0.0                 # seconds after the run began
    ttft: float | None = None          # seconds to the first chunk that carries text
    itl: list[float] = field(default_factory=list)  # seconds between successive text chunks
    e2e: float | None = None           # seconds from sending to the end of the stream
    num_chunks: int = 0                # chunks that carried text
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        """The server's count when it sent usage, else one token per text chunk."""
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.num_chunks

    @property
    def input_tokens(self) -> int:
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.prompt_len

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {"ok": self.ok, "error": self.error, "start_s": self.start, "ttft_s": self.ttft, "tpot_s": self.tpot,
                "e2e_s": self.e2e, "itl_s": self.itl, "prompt_len": self.prompt_len, "output_len": self.output_len,
                "output_tokens": self.output_tokens, "num_chunks": self.num_chunks,
                "usage_prompt_tokens": self.usage_prompt_tokens,
                "usage_completion_tokens": self.usage_completion_tokens}


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(seconds: list[float]) -> dict[str, float | None]:
    """Mean, median, p90, p99 (and extremes) in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    out: dict[str, float | None] = {"mean": sum(ms) / len(ms) if ms else None}
    for p in PERCENTILES:
        out["median" if p == 50 else f"p{p}"] = percentile(ms, p)
    out.update(min=min(ms) if ms else None, max=max(ms) if ms else None, count=len(ms))
    return out


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Everything a run reports. Throughputs count completed requests only, over the run's wall time."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    errors = Counter(r.error or "unknown error" for r in results if not r.ok)
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "output_token_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution([t for t in (r.tpot for r in done) if t is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in done if r.e2e is not None]),
        "output_tokens_from_usage": sum(r.usage_completion_tokens is not None for r in done),
        "prompt_len_mismatches": sum(r.usage_prompt_tokens is not None and r.usage_prompt_tokens != r.prompt_len
                                     for r in done),
        "errors": dict(errors.most_common()),
    }


# -- progress, tables, plots ----------------------------------------------------------------------------------------

class Progress:
    """One line on stderr: redrawn in place on a terminal, every tenth otherwise."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.failed = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if not self.enabled or (not self.tty and self.done % max(1, self.total // 10) and self.done < self.total):
            return
        filled = 24 * self.done // max(1, self.total)
        line = (f"{self.label} [{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total}, "
                f"{self.failed} failed, {time.perf_counter() - self.start:.1f} s")
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        if self.tty and self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_summary(summary: dict, title: str) -> str:
    """One run as a two-column table."""
    rows: list[tuple[str, str]] = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", _num(summary["duration_s"])),
        ("Total input tokens", f"{summary['total_input_tokens']:,}"),
        ("Total output tokens", f"{summary['total_output_tokens']:,}"),
        ("Request throughput (req/s)", _num(summary["request_throughput"], 3)),
        ("Output token throughput (tok/s)", _num(summary["output_token_throughput"])),
        ("Total token throughput (tok/s)", _num(summary["total_token_throughput"])),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        d = summary[key]
        rows.append((f"{name} (ms)", ""))
        rows += [(f"  {stat}", _num(d[stat])) for stat in ("mean", "median", "p90", "p99")]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'=' * 20} {title} {'=' * 20}"]
    lines += [f"{name:<{width}}{value:>14}" if value else name for name, value in rows]
    if summary["errors"]:
        lines.append("Errors:")
        lines += [f"  {count} x {message}" for message, count in summary["errors"].items()]
    return "\n".join(lines)


SWEEP_COLUMNS = (("conc", 6), ("rate", 6), ("ok", 5), ("fail", 5), ("req/s", 8), ("out tok/s", 10),
                 ("TTFT p50", 9), ("TTFT p99", 9), ("TPOT p50", 9), ("TPOT p99", 9), ("ITL p50", 8), ("E2E p50", 9))


def format_sweep(runs: list[dict]) -> str:
    """One row per concurrency level; latencies in ms."""
    header = " ".join(f"{name:>{w}}" for name, w in SWEEP_COLUMNS)
    lines = [header, "-" * len(header)]
    for run in runs:
        s = run["summary"]
        cells = [str(run["max_concurrency"] or "inf"), str(run["request_rate"]), str(s["completed"]),
                 str(s["failed"]), _num(s["request_throughput"], 3), _num(s["output_token_throughput"], 1),
                 _num(s["ttft_ms"]["median"], 1), _num(s["ttft_ms"]["p99"], 1), _num(s["tpot_ms"]["median"], 1),
                 _num(s["tpot_ms"]["p99"], 1), _num(s["itl_ms"]["median"], 1), _num(s["e2e_ms"]["median"], 1)]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, SWEEP_COLUMNS)))
    return "\n".join(lines)


def plot(reports: list[tuple[str, dict]], path: str) -> None:
    """TTFT, TPOT (medians solid, p99 dashed) and output tokens/s against max concurrency, one line per report."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib, which is not installed: pip install 'llama3-server[plot]' "
                         "(or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, report in reports:
        runs = sorted(report["runs"], key=lambda r: r["max_concurrency"] or r["num_prompts"])
        x = [r["max_concurrency"] or r["num_prompts"] for r in runs]
        for ax, key in zip(axes[:2], ("ttft_ms", "tpot_ms")):
            line, = ax.plot(x, [r["summary"][key]["median"] for r in runs], marker="o", label=f"{label} p50")
            ax.plot(x, [r["summary"][key]["p99"] for r in runs], ls="--", color=line.get_color(), label=f"{label} p99")
        axes[2].plot(x, [r["summary"]["output_token_throughput"] for r in runs], marker="o", label=label)
    levels = sorted({r["max_concurrency"] or r["num_prompts"] for _, report in reports for r in report["runs"]})
    titles = ("time to first token (ms)", "time per output token (ms)", "output tokens/s")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="max concurrency")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
