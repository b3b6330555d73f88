"""A deduplicating, delaying work queue of resource keys (client-go workqueue semantics, asyncio).

Every trigger (a resource event, an event on one of its pods, a resync tick, a requeue after work in
progress) just adds the resource's key; a key is never processed by two workers at once, and a key added
while it is being processed is processed once more afterwards. Use from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable


class WorkQueue:
    """Keys with a due time; ``get`` hands out the earliest due key that is not being processed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[Hashable, float] = {}
        self._again: dict[Hashable, float] = {}
        self._processing: set[Hashable] = set()
        self._wakeup = asyncio.Event()
        self._failures: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        """Schedule ``key`` in ``delay`` seconds (an earlier schedule wins)."""
        due = self._clock() + max(0.0, delay)
        target = self._again if key in self._processing else self._due
        target[key] = min(due, target.get(key, due))
        self._wakeup.set()

    def add_rate_limited(self, key: Hashable, base: float = 0.5, cap: float = 30.0) -> float:
        """Schedule a failed key with exponential backoff; returns the delay used."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(cap, base * (2**failures))
        self.add(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """Reset the backoff of ``key`` after a success."""
        self._failures.pop(key, None)

    def discard(self, key: Hashable) -> None:
        """Drop any schedule of ``key`` (the resource is gone)."""
        self._due.pop(key, None)
        self._again.pop(key, None)
        self._failures.pop(key, None)

    def _next(self) -> tuple[Hashable | None, float | None]:
        now = self._clock()
        best: Hashable | None = None
        best_due: float | None = None
        for key, due in self._due.items():
            if best_due is None or due < best_due:
                best, best_due = key, due
        if best is None or best_due is None:
            return None, None
        return (best, None) if best_due <= now else (None, best_due - now)

    async def get(self) -> Hashable:
        """Wait for the next due key and mark it as being processed."""
        while True:
            key, wait = self._next()
            if key is not None:
                del self._due[key]
                self._processing.add(key)
                return key
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)

    def done(self, key: Hashable) -> None:
        """Processing of ``key`` finished; re-adds it if it was triggered meanwhile."""
        self._processing.discard(key)
        if key in self._again:
            due = self._again.pop(key)
            self._due[key] = min(due, self._due.get(key, due))
            self._wakeup.set()
