"""Load polling: one task per replica GETs ``/load`` every ``interval`` seconds, all replicas concurrently.

A slow or dead replica delays only its own task. A successful poll feeds the replica's reading (and closes a
half-open breaker); a failed one counts against its breaker, so a killed replica is ejected even without
traffic. Tasks follow the registry: started when a replica is added, cancelled when it is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from pypto_serving.gateway.client import Client, UpstreamError
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.replicas import LoadReading, Registry, Replica

log = logging.getLogger(__name__)


class Poller:
    """Polls every replica of a registry."""

    def __init__(self, registry: Registry, metrics: GatewayMetrics, interval_s: float = 0.05,
                 timeout_s: float = 1.0) -> None:
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._tasks: dict[int, asyncio.Task] = {}
        self._client = Client(timeout_s, timeout_s, max_body_bytes=64 * 1024)

    async def start(self) -> None:
        """Poll every replica known now and later."""
        self.registry.listeners.append(self._on_change)
        for replica in self.registry:
            self._on_change(replica, "added")

    async def stop(self) -> None:
        """Cancel every polling task and close the connections."""
        if self._on_change in self.registry.listeners:
            self.registry.listeners.remove(self._on_change)
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.close()

    def _on_change(self, replica: Replica, change: str) -> None:
        key = id(replica)
        if change == "added" and key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._loop(replica))
        elif change == "removed":
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()

    async def poll_once(self, replica: Replica) -> bool:
        """Poll one replica now; True when it answered a reading."""
        requested_at = self.registry.clock()
        try:
            status, raw = await self._client.get(replica.url + "/load", self.timeout_s, max_bytes=64 * 1024)
        except UpstreamError as exc:
            self._failed(replica, exc)
            self.registry.failure(replica)  # unreachable or silent: counts against its breaker
            return False
        try:
            if status != 200:
                raise ValueError(f"HTTP {status}")
            reading = LoadReading.from_json(json.loads(raw), requested_at, self.registry.clock())
        except (ValueError, TypeError, AttributeError) as exc:
            self._failed(replica, exc)  # it answers (e.g. 503 while loading): alive, so no breaker failure
            return False
        replica.update(reading)
        self.registry.success(replica)
        return True

    def _failed(self, replica: Replica, exc: Exception) -> None:
        log.debug("poll of %s failed: %r", replica.name, exc)
        self.metrics.poll_failures.labels(replica.name).inc()

    async def _loop(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_once(replica)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
