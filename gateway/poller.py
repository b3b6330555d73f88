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

import aiohttp

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
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tasks: dict[int, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the polling session and poll every replica known now and later."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), timeout=self.timeout,
            auto_decompress=False)
        self.registry.listeners.append(self._on_change)
        for replica in self.registry:
            self._on_change(replica, "added")

    async def stop(self) -> None:
        """Cancel every polling task and close the session."""
        if self._on_change in self.registry.listeners:
            self.registry.listeners.remove(self._on_change)
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

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
        assert self._session is not None
        requested_at = self.registry.clock()
        try:
            async with self._session.get(replica.url + "/load") as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            data = json.loads(raw)
            reading = LoadReading.from_json(data, requested_at, self.registry.clock())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, TypeError, AttributeError) as exc:
            log.debug("poll of %s failed: %r", replica.name, exc)
            self.metrics.poll_failures.labels(replica.name).inc()
            # A replica that answers (e.g. 503 while loading) is alive: only unreachable ones count as failures.
            if not isinstance(exc, aiohttp.ClientResponseError):
                self.registry.failure(replica)
            return False
        replica.update(reading)
        self.registry.success(replica)
        return True

    async def _loop(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_once(replica)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
