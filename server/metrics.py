"""Prometheus metrics: engine gauges and counters read from its stats at scrape time, request histograms."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine import EngineStats
from server.output import RequestOutput

PREFIX = "llama3_server"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        s = self.stats()
        if s is None:
            return
        labels = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{PREFIX}:{name}", doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{PREFIX}:{name}", doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s.running)
        yield gauge("num_requests_waiting", "Sequences waiting for a KV cache slot.", s.waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache slots in use.", s.slots_used / s.num_slots)
        yield gauge("kv_cache_tokens", "Tokens held in the KV cache.", s.tokens_in_cache)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache can hold.", s.cache_capacity_tokens)
        yield counter("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens whose K/V were reused from a freed slot.",
                      s.prefix_cache_hit_tokens)


class Metrics:
    """One registry per server, so tests can run several servers in one process."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram(f"{PREFIX}:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}:time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", labels, buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter(f"{PREFIX}:request_success", "Finished sequences by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)

    def observe(self, out: RequestOutput) -> None:
        for d in out.deltas:
            if d.finish_reason:
                self.finished.labels(self.model_name, d.finish_reason).inc()
        m = out.metrics
        if not out.finished or m is None:
            return
        for histogram, value in ((self.ttft, m.time_to_first_token), (self.tpot, m.time_per_output_token),
                                 (self.e2e, m.e2e_latency)):
            if value is not None:
                histogram.labels(self.model_name).observe(value)

    def observe_aborted(self, num_sequences: int) -> None:
        self.finished.labels(self.model_name, "abort").inc(num_sequences)
