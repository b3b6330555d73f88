"""Late binding: while no replica has a free batch slot, requests wait at the gateway, in arrival order.

A router that commits every request on arrival makes it queue at one engine. When every slot is busy (the
heavy-tailed workload of benchmarks/gateway_routing.py above ~0.7 of capacity), that queue sits behind whichever
running request the router guessed would end first; a long request guessed wrong holds it for seconds while a
slot frees elsewhere. Held here instead, a request takes the first slot that frees on any replica: one queue in
front of all the slots rather than one per replica.

* With ``engine_queue_depth`` d > 0, a replica counts as free while fewer than d requests wait in its own queue:
  the engine then admits its next request the moment a slot frees, with no round trip through the gateway (each
  such hand-over leaves the slot empty for about one engine step), and only the rest wait here.
* A request passes at once when the queue is empty and a slot is free, when some eligible replica's slots are
  unknown (no fresh reading, or an engine that does not report ``max_num_seqs``: nothing to wait for), when no
  replica is eligible (the proxy answers 503 at once), or when ``max_waiting`` requests already wait.
* A waiting request is released, oldest first, when a slot frees: the gateway sees one of its own requests end,
  or a pushed (or polled) reading shows one. Released requests are counted until they dispatch, so one free slot
  releases one request.
* After ``max_wait_s`` a request goes on anyway and queues at the engine its policy picks, as without the queue.
* A client that goes away while waiting leaves the queue (a release it had not used yet goes to the next one).

Only the first attempt waits; retries after a failed attempt go at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from pypto_serving.gateway.replicas import Registry


class SlotQueue:
    """Requests held at the gateway until a batch slot frees on some replica (see the module docstring)."""

    def __init__(self, registry: Registry, max_wait_s: float, max_waiting: int, stale_after_s: float,
                 engine_queue_depth: int = 0) -> None:
        self.registry = registry
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.stale_after_s = stale_after_s
        self.engine_queue_depth = engine_queue_depth  # requests a replica may queue beyond its slots
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._released = 0  # woken (a slot was free for them) but not dispatched yet
        self.expired = 0  # requests that waited ``max_wait_s`` and went on without a free slot
        registry.on_capacity.append(self.release)

    def __len__(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def free_slots(self) -> int | None:
        """Free batch slots over the eligible replicas (this gateway's undispatched releases taken), or None
        when the queue must not hold: no eligible replica, or one whose slots are unknown."""
        now = self.registry.clock()
        replicas = self.registry.eligible(now=now)
        if not replicas:
            return None
        total = 0
        for replica in replicas:
            free = replica.free_slots(self.stale_after_s, now)
            if free is None:
                return None
            total += max(0, free + self.engine_queue_depth)
        return total - self._released

    async def wait(self) -> float:
        """Wait (if needed) until this request may dispatch; returns the seconds waited. The caller must dispatch
        without awaiting anything in between, so that the slot it was released for is counted as taken."""
        if self.max_wait_s <= 0:
            return 0.0
        free = self.free_slots()
        if free is None or (free > 0 and not len(self)) or len(self._waiters) >= self.max_waiting:
            return 0.0
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self.max_wait_s, self._expire, waiter)
        try:
            if await waiter:
                self._released -= 1
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._released -= 1  # released but gone: its slot goes to the next one
                self.release()
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):  # released waiters have left the queue already
                self._waiters.remove(waiter)
        return time.perf_counter() - started

    def release(self) -> None:
        """Release waiting requests, oldest first, one per free slot (called when capacity may have changed)."""
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        if not waiters:
            return
        free = self.free_slots()
        while waiters and (free is None or free > 0):
            waiter = waiters.popleft()
            if waiter.done():
                continue
            waiter.set_result(True)
            self._released += 1
            if free is not None:
                free -= 1

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self.expired += 1
