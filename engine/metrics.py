"""Prometheus metrics of one engine app, in its own registry, under vLLM's names where vLLM has one.

Gauges and cumulative engine counters are read at scrape time from the snapshot the engine loop thread
publishes (no lock, no call into the engine); latency histograms and token counters are fed by the server as
each request progresses (`RequestTimer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, help, key in the engine's load() / stats() snapshot)
GAUGES = (
    ("vllm:num_requests_running", "Requests in the running batch.", "running"),
    ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", "waiting"),
    ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", "kv_cache_usage"),
    ("pypto:pending_tokens", "Prompt tokens not yet computed + tokens still to generate, all requests.",
     "pending_tokens"),
)
COUNTERS = (
    ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
    ("vllm:num_preemptions", "Requests preempted for lack of KV-cache blocks.", "num_preemptions"),
)


class EngineCollector(Collector):
    """Reads the loop thread's latest load/stats snapshot at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
                 draining: Callable[[], bool]) -> None:
        self.model_name = model_name
        self.snapshot = snapshot
        self.draining = draining

    def collect(self) -> Iterator[Metric]:
        load, stats = self.snapshot()
        for name, doc, key in GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([self.model_name], float(load.get(key, 0) or 0))
            yield gauge
        for name, doc, key in COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield counter
        inflight = GaugeMetricFamily("pypto:pp_inflight_micro_batches",
                                     "Micro-batches in flight on the pipeline stages when the engine last waited "
                                     "for one (0 when idle).",
                                     labels=["model_name"])
        inflight.add_metric([self.model_name], float(stats.get("pp_inflight_micro_batches", 0) or 0))
        yield inflight
        idle = GaugeMetricFamily("pypto:pp_stage_idle_ratio", "Per pipeline stage, the fraction of the time with "
                                 "work in flight that the stage did not compute (the pipeline bubble), since start.",
                                 labels=["model_name", "stage"])
        for stage, ratio in enumerate(stats.get("pp_stage_idle_ratio") or []):
            idle.add_metric([self.model_name, str(stage)], float(ratio))
        yield idle
        experts = CounterMetricFamily("pypto:moe_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                      "(load imbalance).", labels=["model_name", "layer", "expert"])
        for layer, counts in sorted((stats.get("moe_expert_tokens") or {}).items()):
            for expert, count in enumerate(counts):
                experts.add_metric([self.model_name, str(layer), str(expert)], float(count))
        if stats.get("moe_expert_tokens"):  # MoE models only
            yield experts
        if "dp_dummy_steps" in stats:  # DP+EP lockstep ranks only
            for name, doc, key in DP_COUNTERS:
                counter = CounterMetricFamily(name, doc, labels=["model_name"])
                counter.add_metric([self.model_name], float(stats.get(key, 0) or 0))
                yield counter
        draining = GaugeMetricFamily("pypto:draining", "1 while the engine drains (admits no new requests).",
                                     labels=["model_name"])
        draining.add_metric([self.model_name], 1.0 if self.draining() else 0.0)
        yield draining


DP_COUNTERS = [
    ("pypto:dp_dummy_steps", "DP+EP: steps this rank ran a one-token dummy batch because only other DP ranks had "
     "work.", "dp_dummy_steps"),
    ("pypto:dp_sync_seconds", "DP+EP: time spent in the per-step metadata all-reduce of the lockstep group.",
     "dp_sync_seconds"),
]


class EngineMetrics:
    """All metrics of one app; `render()` is the /metrics body."""

    def __init__(self, model_name: str, snapshot: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
                 draining: Callable[[], bool]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between successive output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token of a request.",
                              labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=reg).labels(model_name)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=reg)
        self.registry.register(EngineCollector(model_name, snapshot, draining))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        """A timer for one core request (one choice)."""
        return RequestTimer(self)


class RequestTimer:
    """Feeds the latency histograms and token counters for one core request."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def on_tokens(self, count: int) -> None:
        """`count` new tokens arrived now."""
        if count <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe((now - self.last) / count)
        self.last = now
        self.tokens += count
        self.metrics.generation_tokens.inc(count)

    def on_finish(self, finish_reason: str, prompt_tokens: int) -> None:
        """The request ended with `finish_reason`."""
        self.metrics.e2e.observe(time.monotonic() - self.start)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.request_success.labels(self.metrics.model_name, finish_reason).inc()
        if self.first is not None and self.last is not None and self.tokens > 1:
            self.metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))
