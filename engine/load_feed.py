"""Pushed load: `GET /load?watch=1` streams the engine's load to each watcher (a gateway) as server-sent events.

The engine loop thread hands each published load snapshot to `LoadFeed.publish` on the event loop, together with
the dispatch ids (the gateway's `x-pypto-dispatch` of each attempt) of the requests it admitted before taking that
snapshot. So an update's counts always include the requests it lists: the gateway drops its own estimate for
exactly those, and keeps counting the ones not listed yet.

Each watcher gets an update when the load changed, at most one per `min_interval_s` (changes in between are
coalesced; their admitted ids accumulate), and a heartbeat with the same document at least every `heartbeat_s`,
which bounds how stale a silent stream can look. The first update of a stream lists every admitted request still
in flight, so a gateway that (re)connects starts exact. A watcher that stops reading is cut once its unsent ids
pass a bound; it reconnects and starts from a full list again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from pypto_serving.contract import (
    LOAD_HEARTBEAT_S,
    LOAD_PUSH_MIN_INTERVAL_S,
    MAX_ADMITTED_PER_UPDATE,
    LoadReport,
)

MAX_WATCHERS = 64  # gateways per engine; more get a 503 (each is one long-lived connection)
MAX_UNSENT_IDS = 16 * 1024  # a watcher that falls this far behind is cut (it reconnects with a full list)


class _Watcher:
    __slots__ = ("ids", "wake")

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids  # admitted dispatch ids not sent yet
        self.wake = asyncio.Event()


class LoadFeed:
    """The engine side of the pushed load: the latest snapshot, the in-flight dispatch ids, and the watchers."""

    def __init__(self, report: Callable[[dict[str, Any]], LoadReport],
                 min_interval_s: float = LOAD_PUSH_MIN_INTERVAL_S, heartbeat_s: float = LOAD_HEARTBEAT_S) -> None:
        self.report = report  # engine load snapshot -> the document (the server adds draining)
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self.load: dict[str, Any] = {}
        self.in_flight: dict[str, str] = {}  # core request id -> dispatch id, for admitted requests not finished
        self._watchers: set[_Watcher] = set()
        self.closed = False

    @property
    def watchers(self) -> int:
        """Open watch streams."""
        return len(self._watchers)

    def full(self) -> bool:
        """No room for another watcher (or the server is exiting)."""
        return self.closed or len(self._watchers) >= MAX_WATCHERS

    def publish(self, load: dict[str, Any], admitted: list[tuple[str, str]]) -> None:
        """A new snapshot from the engine loop, with the (core id, dispatch id) of the requests admitted before it."""
        self.load = load
        ids = []
        for core_id, dispatch_id in admitted:
            self.in_flight[core_id] = dispatch_id
            ids.append(dispatch_id)
        for watcher in list(self._watchers):
            watcher.ids += ids
            if len(watcher.ids) > MAX_UNSENT_IDS:
                watcher.ids = []
                self._watchers.discard(watcher)  # its stream ends at its next wake-up
            watcher.wake.set()

    def finished(self, core_id: str) -> None:
        """A request ended (finished, failed or aborted)."""
        self.in_flight.pop(core_id, None)

    def close(self) -> None:
        """End every stream (the server is exiting: it waits for open responses) and refuse new ones."""
        self.closed = True
        watchers, self._watchers = self._watchers, set()
        for watcher in watchers:
            watcher.wake.set()

    def changed(self) -> None:
        """Something outside the snapshot changed (draining): send an update now."""
        for watcher in self._watchers:
            watcher.wake.set()

    async def stream(self) -> AsyncIterator[bytes]:
        """One watcher's server-sent events, until it goes away (or falls too far behind)."""
        watcher = _Watcher(sorted(set(self.in_flight.values())))
        self._watchers.add(watcher)
        loop = asyncio.get_running_loop()
        try:
            last: dict[str, Any] | None = None
            last_sent = 0.0
            while True:
                doc = self.report(self.load).to_json()
                if watcher.ids or doc != last or loop.time() - last_sent >= self.heartbeat_s:
                    for event in _events(doc, watcher):
                        yield event
                    last, last_sent = doc, loop.time()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), self.heartbeat_s)
                if watcher not in self._watchers:
                    return
                watcher.wake.clear()
                await asyncio.sleep(max(0.0, last_sent + self.min_interval_s - loop.time()))  # coalesce
        finally:
            self._watchers.discard(watcher)


def _events(doc: dict[str, Any], watcher: _Watcher) -> list[bytes]:
    """The doc with the watcher's unsent ids, as events of at most MAX_ADMITTED_PER_UPDATE ids each."""
    ids, watcher.ids = watcher.ids, []
    chunks = [ids[i:i + MAX_ADMITTED_PER_UPDATE] for i in range(0, len(ids), MAX_ADMITTED_PER_UPDATE)] or [[]]
    return [b"data: " + json.dumps({**doc, "admitted": chunk}, separators=(",", ":")).encode() + b"\n\n"
            for chunk in chunks]
