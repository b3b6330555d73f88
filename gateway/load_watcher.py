"""Engine load: each replica's pushed load stream (``GET /load?watch=1``), or polling where it has none.

One task per replica, following the registry (started when a replica is added, cancelled when it is removed):

* **watch**: one long-lived request per replica. Each server-sent event is a `LoadUpdate`: the engine's counts and
  the dispatch ids it admitted since the previous one (`Replica.pushed`). The engine sends on change (at most one
  per ~10 ms) and a heartbeat every second, so a stream silent for ``stale_after_s`` is cut (the replica's reading
  goes stale: unknown, not idle) and opened again. Idle, a replica costs one small event per second;
* **poll**: an engine that answers ``?watch=1`` with a plain ``/load`` document (one that does not stream) is
  polled every ``interval`` seconds instead, as before, and its stream is tried again every minute.

A replica that cannot be reached counts against its breaker (so a killed replica is ejected even without traffic),
and is retried with a backoff. An answer that breaks the contract ends the stream and counts as a failure too;
a 503 (e.g. while loading) does not: the replica is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math

from pypto_serving.contract import LOAD_WATCH_PARAM, PATH_LOAD, LoadUpdate
from pypto_serving.gateway.client import Client, UpstreamError
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.replicas import LoadReading, Registry, Replica

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024  # one update line (the engine sends at most 256 ids per update: ~20 KiB)
MAX_BACKOFF_S = 1.0
REWATCH_S = 60.0  # an engine that answered with a plain /load is polled this long before its stream is tried again
WATCH_HEADERS = (("accept", "text/event-stream"),)


class ContractBroken(Exception):
    """The replica's load answer is not what the contract says."""


class LoadWatcher:
    """Keeps every replica's load reading current."""

    def __init__(self, registry: Registry, metrics: GatewayMetrics, interval_s: float = 0.05,
                 timeout_s: float = 1.0, stale_after_s: float = 2.0, watch: bool = True) -> None:
        self.registry = registry
        self.metrics = metrics
        self.interval_s = interval_s  # polling period, and the first retry delay
        self.timeout_s = timeout_s  # a poll's answer
        self.stale_after_s = stale_after_s  # a watch stream silent this long is cut
        self.watch_enabled = watch  # False: poll every replica
        self._tasks: dict[int, asyncio.Task] = {}
        self._client = Client(timeout_s, timeout_s, max_body_bytes=64 * 1024)

    async def start(self) -> None:
        """Follow every replica known now and later."""
        self.registry.listeners.append(self._on_change)
        for replica in self.registry:
            self._on_change(replica, "added")

    async def stop(self) -> None:
        """Cancel every task and close the connections."""
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

    async def _loop(self, replica: Replica) -> None:
        delay = self.interval_s
        while True:
            if not self.watch_enabled or replica.load_source == "poll":
                await self._poll_for(replica, REWATCH_S if self.watch_enabled else math.inf)
                replica.load_source = "none"  # it may stream now (e.g. upgraded at the same address): try again
                continue
            try:
                await self.watch(replica)
                delay = self.interval_s  # the stream ended cleanly (the engine exits, or cut a slow reader)
            except (ContractBroken, UpstreamError) as exc:  # a bad stream, unreachable, or silent past the bound
                self._failed(replica, exc)
                self.registry.failure(replica)
            except ValueError as exc:  # it answers, but not with a load stream (e.g. 503 while loading): alive
                self._failed(replica, exc)
            if replica.load_source == "watch":
                replica.load_source = "none"
            if replica.load_source != "poll":
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _poll_for(self, replica: Replica, seconds: float) -> None:
        """Poll an engine that does not stream its load, every ``interval_s``, for ``seconds``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until:
            started = loop.time()
            await self.poll_once(replica)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))

    async def watch(self, replica: Replica) -> None:
        """Read the replica's load stream until it ends; a plain ``/load`` answer switches the replica to polling.
        Raises UpstreamError (unreachable, silent too long), ContractBroken, or ValueError (no load stream)."""
        clock = self.registry.clock
        url = f"{replica.url}{PATH_LOAD}?{LOAD_WATCH_PARAM}=1"
        requested_at = clock()
        response = await self._client.send("GET", url, WATCH_HEADERS, timeout_s=self.stale_after_s)
        try:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status} to the load watch")
            if not response.content_type.startswith("text/event-stream"):  # it does not stream: poll it
                self._apply_poll(replica, await response.read(), requested_at)
                replica.load_source = "poll"
                return
            first = True
            while line := await response.next_line(MAX_EVENT_BYTES):
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, other fields
                try:
                    update = LoadUpdate.parse(json.loads(line[5:]))
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    raise ContractBroken(f"bad load update: {exc}") from None
                now = clock()
                replica.pushed(LoadReading.from_report(update, now, now), update.admitted)
                self.registry.capacity_changed()
                if first:
                    replica.load_source = "watch"
                    first = False
                if replica.breaker.open_until is not None:  # ejected before: closes once its back-off is over
                    self.registry.success(replica)
        finally:
            response.release()

    async def poll_once(self, replica: Replica) -> bool:
        """Poll one replica's ``/load`` now; True when it answered a reading."""
        requested_at = self.registry.clock()
        try:
            status, raw = await self._client.get(replica.url + PATH_LOAD, self.timeout_s, max_bytes=64 * 1024)
        except UpstreamError as exc:
            self._failed(replica, exc)
            self.registry.failure(replica)  # unreachable or silent: counts against its breaker
            return False
        try:
            if status != 200:
                raise ValueError(f"HTTP {status}")
            self._apply_poll(replica, raw, requested_at)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
            self._failed(replica, exc)  # it answers (e.g. 503 while loading): alive, so no breaker failure
            return False
        return True

    def _apply_poll(self, replica: Replica, raw: bytes, requested_at: float) -> None:
        reading = LoadReading.from_json(json.loads(raw), requested_at, self.registry.clock())
        replica.update(reading)
        self.registry.success(replica)
        self.registry.capacity_changed()

    def _failed(self, replica: Replica, exc: Exception) -> None:
        log.debug("load of %s failed: %r", replica.name, exc)
        self.metrics.poll_failures.labels(replica.name).inc()
