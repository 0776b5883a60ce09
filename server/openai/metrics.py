"""Prometheus metrics: engine gauges and counters read from its stats at scrape time, request histograms.

Each is exported under our prefix and, where vLLM has the same metric, under vLLM's name too (`vllm:...`, same
labels and meaning): Kubernetes' Gateway API Inference Extension, llm-d's endpoint picker, KEDA autoscalers and
vLLM's production-stack router read those names. Scraping only reads numbers the engine thread has published
(`AsyncEngine.stats()`), so /metrics answers at once however busy the engine is."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.llm_engine import EngineStats
from server.engine.output import RequestOutput

PREFIX = "llama3_server"
VLLM = "vllm"
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

        def gauge(name, doc, value, prefix=PREFIX):
            g = GaugeMetricFamily(f"{prefix}:{name}", doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name, doc, value, prefix=PREFIX):
            c = CounterMetricFamily(f"{prefix}:{name}", doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        shared = [(gauge, "num_requests_running", "Sequences in the running batch.", s.running),
                  (gauge, "num_requests_waiting", "Sequences waiting to be scheduled (preempted ones included).",
                   s.waiting),
                  (gauge, "kv_cache_usage_perc", "Fraction (0-1) of KV cache blocks in use.",
                   s.blocks_used / max(s.num_blocks, 1)),
                  (counter, "num_preemptions", "Sequences preempted for want of KV cache blocks.",
                   s.num_preemptions),
                  (counter, "prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total),
                  (counter, "generation_tokens", "Tokens generated.", s.generation_tokens_total)]
        for make, name, doc, value in shared:
            yield make(name, doc, value)
            yield make(name, doc, value, prefix=VLLM)
        yield gauge("kv_cache_tokens", "Tokens held in the KV cache.", s.tokens_in_cache)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache can hold.", s.cache_capacity_tokens)
        yield gauge("kv_cache_blocks", "KV cache blocks in the pool.", s.num_blocks)
        yield gauge("kv_cache_blocks_used", "KV cache blocks held by sequences.", s.blocks_used)
        yield gauge("kv_cache_block_size", "Tokens per KV cache block.", s.block_size)
        # As vLLM reports it: num_gpu_blocks is the pool on the serving device (on CPU too); no swap space.
        info = GaugeMetricFamily(f"{VLLM}:cache_config_info", "Information of the KV cache configuration.",
                                 labels=["model_name", "block_size", "num_gpu_blocks", "num_cpu_blocks",
                                         "enable_prefix_caching"])
        info.add_metric([self.model_name, str(s.block_size), str(s.num_blocks), "0", str(s.prefix_caching).lower()],
                        1.0)
        yield info
        yield counter("prefix_cache_hit_tokens", "Prompt tokens whose K/V were found in cached blocks.",
                      s.prefix_cache_hit_tokens)
        if s.spec_accepted_per_position:  # speculative decoding is on: vLLM's names
            yield counter("spec_decode_num_drafts", "Speculative drafts verified.", s.spec_drafts_total, prefix=VLLM)
            yield counter("spec_decode_num_draft_tokens", "Tokens proposed in speculative drafts.",
                          s.spec_draft_tokens_total, prefix=VLLM)
            yield counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                          s.spec_accepted_tokens_total, prefix=VLLM)
            per_position = CounterMetricFamily(f"{VLLM}:spec_decode_num_accepted_tokens_per_pos",
                                               "Proposed tokens accepted, by position in the draft.",
                                               labels=["model_name", "position"])
            for position, value in enumerate(s.spec_accepted_per_position):
                per_position.add_metric([self.model_name, str(position)], value)
            yield per_position


class Metrics:
    """One registry per server, so tests can run several servers in one process."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]

        def both(make, name, doc, *args, **kwargs):
            return [make(f"{prefix}:{name}", doc, *args, registry=self.registry, **kwargs) for prefix in (PREFIX, VLLM)]

        self.ttft = both(Histogram, "time_to_first_token_seconds", "Time to first token.", labels,
                         buckets=LATENCY_BUCKETS)
        self.tpot = both(Histogram, "time_per_output_token_seconds", "Mean time per output token after the first, "
                         "per request.", labels, buckets=TOKEN_LATENCY_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "End-to-end request latency.", labels,
                        buckets=LATENCY_BUCKETS)
        self.finished = both(Counter, "request_success", "Finished sequences by finish reason.",
                             labels + ["finished_reason"])

    def observe(self, out: RequestOutput) -> None:
        for d in out.deltas:
            if d.finish_reason:
                for c in self.finished:
                    c.labels(self.model_name, d.finish_reason).inc()
        m = out.metrics
        if not out.finished or m is None:
            return
        for histograms, value in ((self.ttft, m.time_to_first_token), (self.tpot, m.time_per_output_token),
                                  (self.e2e, m.e2e_latency)):
            if value is not None:
                for h in histograms:
                    h.labels(self.model_name).observe(value)

    def observe_aborted(self, num_sequences: int) -> None:
        for c in self.finished:
            c.labels(self.model_name, "abort").inc(num_sequences)
