"""Operator health and Prometheus metrics, served on one port (8081): /healthz, /readyz, /metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pypto_serving.contract import PATH_METRICS


class Metrics:
    """The operator's metrics, in a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter("pypto_operator_reconciles_total", "Reconciles by result (success, error)",
                                  ["result"], registry=self.registry)
        self.errors = Counter("pypto_operator_reconcile_errors_total", "Reconciles that raised an error",
                              registry=self.registry)
        self.duration = Histogram("pypto_operator_reconcile_duration_seconds", "Time of one reconcile",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                  registry=self.registry)
        self.actions = Counter("pypto_operator_actions_total", "Actions applied (create, drain, delete)",
                               ["action"], registry=self.registry)
        self.managed_replicas = Gauge("pypto_operator_managed_replicas", "Engine replicas per resource",
                                      ["namespace", "name", "state"], registry=self.registry)
        self.managed_resources = Gauge("pypto_operator_managed_resources", "PyptoServing resources known",
                                       registry=self.registry)
        self.leader = Gauge("pypto_operator_leader", "1 while this replica holds the leader lease",
                            registry=self.registry)
        self.queue_depth = Gauge("pypto_operator_queue_depth", "Resources waiting to be reconciled",
                                 registry=self.registry)

    def set_replicas(self, namespace: str, name: str, total: int, ready: int) -> None:
        """Record one resource's replica counts."""
        self.managed_replicas.labels(namespace, name, "total").set(total)
        self.managed_replicas.labels(namespace, name, "ready").set(ready)

    def forget(self, namespace: str, name: str) -> None:
        """Drop the series of a deleted resource."""
        for state in ("total", "ready"):
            with contextlib.suppress(KeyError):
                self.managed_replicas.remove(namespace, name, state)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)


class HealthServer:
    """aiohttp server for /healthz (the loop answers and the workers are alive), /readyz and /metrics."""

    def __init__(self, metrics: Metrics, alive: Callable[[], bool], host: str = "127.0.0.1", port: int = 8081) -> None:
        self.metrics, self.alive, self.host, self.port = metrics, alive, host, port
        self.started = time.time()
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        ok = self.alive()
        return web.json_response({"status": "ok" if ok else "unhealthy", "uptime": round(time.time() - self.started)},
                                 status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        """Listen (returns once bound)."""
        app = web.Application()
        app.add_routes([web.get("/healthz", self._healthz), web.get("/readyz", self._healthz),
                        web.get(PATH_METRICS, self._metrics)])
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
