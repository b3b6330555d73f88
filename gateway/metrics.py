"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DECISION_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2)
OVERHEAD_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """The gateway's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pypto_gateway_requests", "Requests answered, by replica and HTTP status",
                                ["replica", "code"], registry=r)
        self.decision = Histogram("pypto_gateway_routing_decision_seconds", "Time to choose a replica",
                                  buckets=DECISION_BUCKETS, registry=r)
        self.retries = Counter("pypto_gateway_retries", "Requests retried on another replica, by reason",
                               ["reason"], registry=r)
        self.ejections = Counter("pypto_gateway_ejections", "Replicas ejected by their circuit breaker",
                                 ["replica"], registry=r)
        self.upstream_ttft = Histogram("pypto_gateway_upstream_ttft_seconds",
                                       "Dispatch to first response body byte of streaming requests",
                                       ["replica"], buckets=TTFT_BUCKETS, registry=r)
        self.overhead = Histogram("pypto_gateway_overhead_seconds",
                                  "Time a request spends in the gateway: leg=request from the whole request received "
                                  "to its first upstream attempt, leg=response from the first upstream body bytes "
                                  "to their write to the client", ["leg"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.overhead_request = self.overhead.labels("request")
        self.overhead_response = self.overhead.labels("response")
        self.replicas = Gauge("pypto_gateway_replicas", "Known replicas by state", ["state"], registry=r)
        self.poll_failures = Counter("pypto_gateway_load_poll_failures", "Failed /load polls", ["replica"],
                                     registry=r)

        self._request_counters: dict[tuple[str, str], Counter] = {}
        self._ttft_histograms: dict[str, Histogram] = {}

    def count(self, replica: str, code: str) -> None:
        """One more answered request (the labelled child is looked up once per label pair: the hot path)."""
        child = self._request_counters.get((replica, code))
        if child is None:
            child = self._request_counters[(replica, code)] = self.requests.labels(replica, code)
        child.inc()

    def ttft(self, replica: str, seconds: float) -> None:
        """Observe one upstream time to first byte."""
        child = self._ttft_histograms.get(replica)
        if child is None:
            child = self._ttft_histograms[replica] = self.upstream_ttft.labels(replica)
        child.observe(seconds)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
