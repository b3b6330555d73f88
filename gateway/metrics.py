"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one process).

The metrics updated on every request (requests by replica and code, routing decision time, time inside the
gateway, upstream TTFT) are plain counts behind a prometheus_client collector: the gateway updates them from its
one event-loop thread, so they need none of the locks that prometheus_client's metric objects take on every
update (about a tenth of the gateway's CPU per request). prometheus_client still renders everything.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DECISION_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)
OVERHEAD_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueState(Protocol):
    """What the metrics read of the gateway's slot queue."""

    expired: int

    def __len__(self) -> int: ...


class LoopHistogram:
    """A histogram updated from one thread only: a bucket count and a sum, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), ending with +Inf."""
        out, total = [], 0
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class LoopMetrics(Collector):
    """The per-request metrics, as plain counts keyed by label values, rendered by prometheus_client."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.decision = LoopHistogram(DECISION_BUCKETS)
        self.overhead = {leg: LoopHistogram(OVERHEAD_BUCKETS) for leg in ("request", "response")}
        self.ttft: dict[str, LoopHistogram] = {}
        self.queue_wait = LoopHistogram(QUEUE_BUCKETS)
        self.slot_queue: QueueState | None = None

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("pypto_gateway_requests", "Requests answered, by replica and HTTP status",
                                       labels=["replica", "code"])
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(labels, count)
        yield requests
        decision = HistogramMetricFamily("pypto_gateway_routing_decision_seconds", "Time to choose a replica")
        decision.add_metric([], self.decision.cumulative(), self.decision.sum)
        yield decision
        overhead = HistogramMetricFamily(
            "pypto_gateway_overhead_seconds", "Time a request spends in the gateway: leg=request from the whole "
            "request received to its first upstream attempt, leg=response from the first upstream body bytes to "
            "their write to the client", labels=["leg"])
        for leg, histogram in self.overhead.items():
            overhead.add_metric([leg], histogram.cumulative(), histogram.sum)
        yield overhead
        ttft = HistogramMetricFamily("pypto_gateway_upstream_ttft_seconds",
                                     "Dispatch to first response body byte of streaming requests", labels=["replica"])
        for replica, histogram in sorted(self.ttft.items()):
            ttft.add_metric([replica], histogram.cumulative(), histogram.sum)
        yield ttft
        wait = HistogramMetricFamily("pypto_gateway_queue_wait_seconds",
                                     "Time requests waited at the gateway for a free batch slot (those that waited)")
        wait.add_metric([], self.queue_wait.cumulative(), self.queue_wait.sum)
        yield wait
        if self.slot_queue is not None:
            yield GaugeMetricFamily("pypto_gateway_queued_requests", "Requests waiting at the gateway for a free "
                                    "batch slot now", value=len(self.slot_queue))
            yield CounterMetricFamily("pypto_gateway_queue_expired", "Requests that waited --queue-wait and went "
                                      "on to an engine's queue", value=self.slot_queue.expired)


class GatewayMetrics:
    """The gateway's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.loop = LoopMetrics()
        r.register(self.loop)
        self.decision = self.loop.decision
        self.overhead_request = self.loop.overhead["request"]
        self.overhead_response = self.loop.overhead["response"]
        self.queue_wait = self.loop.queue_wait
        self.retries = Counter("pypto_gateway_retries", "Requests retried on another replica, by reason",
                               ["reason"], registry=r)
        self.ejections = Counter("pypto_gateway_ejections", "Replicas ejected by their circuit breaker",
                                 ["replica"], registry=r)
        self.replicas = Gauge("pypto_gateway_replicas", "Known replicas by state", ["state"], registry=r)
        self.poll_failures = Counter("pypto_gateway_load_poll_failures", "Failed /load polls and load streams",
                                     ["replica"], registry=r)

    def count(self, replica: str, code: str) -> None:
        """One more answered request."""
        key = (replica, code)
        self.loop.requests[key] = self.loop.requests.get(key, 0) + 1

    def ttft(self, replica: str, seconds: float) -> None:
        """Observe one upstream time to first byte."""
        histogram = self.loop.ttft.get(replica)
        if histogram is None:
            histogram = self.loop.ttft[replica] = LoopHistogram(TTFT_BUCKETS)
        histogram.observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
