"""The controller loop: a work queue of PyptoServing keys drained by worker threads, a periodic resync, and
leader election gating the workers. kopf's watch handlers (handlers.py) only add keys to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pypto_serving.operator.leader import LeaderElector
from pypto_serving.operator.metrics import Metrics
from pypto_serving.operator.reconciler import Reconciler
from pypto_serving.operator.workqueue import WorkQueue

log = logging.getLogger("pypto_serving.operator.controller")
Key = tuple[str, str]  # (namespace, name)


@dataclass
class ControllerConfig:
    """Tuning knobs (flags of `pypto-serving operator`)."""

    workers: int = 4
    resync_seconds: float = 30.0


class Controller:
    """Owns the queue, the workers and the set of known resources."""

    def __init__(self, reconciler: Reconciler, metrics: Metrics, config: ControllerConfig,
                 elector: LeaderElector | None = None) -> None:
        self.reconciler, self.metrics, self.config, self.elector = reconciler, metrics, config, elector
        self.queue = WorkQueue()
        self.known: dict[Key, tuple[str, int]] = {}  # key -> (uid, generation) last seen
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reconcile")
        self.tasks: list[asyncio.Task[None]] = []
        self.heartbeat = time.monotonic()

    # --- triggers (event loop only) ---------------------------------------------------------------------------
    def resource_seen(self, key: Key, uid: str, generation: int, force: bool = False) -> None:
        """A PyptoServing event: reconcile when it is new (or recreated) or its spec (generation) changed."""
        if force or self.known.get(key) != (uid, generation):
            self.queue.add(key)
        self.known[key] = (uid, generation)
        self.metrics.managed_resources.set(len(self.known))

    def resource_gone(self, key: Key) -> None:
        """A PyptoServing was deleted."""
        self.known.pop(key, None)
        self.queue.discard(key)
        self.metrics.forget(*key)
        self.metrics.managed_resources.set(len(self.known))

    def trigger(self, key: Key) -> None:
        """Something owned by the resource changed (a pod event)."""
        if key in self.known:
            self.queue.add(key)

    def leading(self) -> bool:
        """Whether this replica may reconcile."""
        return self.elector is None or self.elector.leading

    def on_leadership(self, leading: bool) -> None:
        """Leadership changed: a new leader re-examines everything."""
        self.metrics.leader.set(1 if leading else 0)
        if leading:
            for key in list(self.known):
                self.queue.add(key)

    # --- loops ------------------------------------------------------------------------------------------------
    def alive(self) -> bool:
        """For /healthz: every loop task is running and the loop has ticked recently."""
        return all(not t.done() for t in self.tasks) and time.monotonic() - self.heartbeat < 30

    def start(self) -> None:
        """Spawn the worker, resync and election tasks (in the running loop)."""
        self.metrics.leader.set(1 if self.leading() else 0)
        for i in range(self.config.workers):
            self.tasks.append(asyncio.create_task(self._worker(), name=f"pypto-worker-{i}"))
        self.tasks.append(asyncio.create_task(self._resync(), name="pypto-resync"))
        if self.elector is not None:
            self.tasks.append(asyncio.create_task(self.elector.run(), name="pypto-leader-election"))

    async def stop(self) -> None:
        """Cancel the loops, release the lease."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        if self.elector is not None:
            await asyncio.to_thread(self.elector.release)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _resync(self) -> None:
        """Heartbeat, queue gauge, and every ``resync_seconds`` a reconcile of every known resource."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.config.resync_seconds))
            self.heartbeat = time.monotonic()
            self.metrics.queue_depth.set(len(self.queue))
            if self.heartbeat - last >= self.config.resync_seconds:
                last = self.heartbeat
                if self.leading():
                    for key in list(self.known):
                        self.queue.add(key)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.elector is not None:
                await self.elector.wait_leading()
            key = await self.queue.get()
            try:
                if not self.leading():
                    self.queue.add(key)  # picked up again once this replica leads
                    continue
                started = time.perf_counter()
                try:
                    outcome = await loop.run_in_executor(self.pool, self.reconciler.reconcile, *key)
                except Exception as exc:
                    self.metrics.reconciles.labels("error").inc()
                    self.metrics.errors.inc()
                    delay = self.queue.add_rate_limited(key)
                    log.warning("reconcile of %s/%s failed (retry in %.1fs): %s", *key, delay, exc)
                    continue
                finally:
                    self.metrics.duration.observe(time.perf_counter() - started)
                self.metrics.reconciles.labels("success").inc()
                self.queue.forget(key)
                if not outcome.exists:
                    self.resource_gone(key)
                elif outcome.requeue_after is not None:
                    self.queue.add(key, outcome.requeue_after)
            finally:
                self.queue.done(key)
