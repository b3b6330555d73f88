"""The pushed load (`GET /load?watch=1`): LoadFeed's coalescing, heartbeat, first-update list, bounds and close
(pure asyncio), and a real engine listing the dispatch ids it admitted in updates whose counts include them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pypto_serving.contract import DISPATCH_HEADER, MAX_ADMITTED_PER_UPDATE, LoadReport, LoadUpdate
from pypto_serving.engine import load_feed
from pypto_serving.engine.load_feed import LoadFeed
from tests.support.engines import EngineProcess


def make_feed(**kwargs: Any) -> LoadFeed:
    return LoadFeed(lambda load: LoadReport(running=load.get("running", 0), waiting=load.get("waiting", 0)), **kwargs)


async def take(stream: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next `count` updates of a stream, parsed."""
    out = []
    for _ in range(count):
        event = await asyncio.wait_for(stream.__anext__(), timeout)
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        out.append(json.loads(event[6:]))
    return out


def test_updates_list_admitted_ids_once_and_coalesce_changes() -> None:
    async def main() -> None:
        feed = make_feed(min_interval_s=0.05, heartbeat_s=10)
        stream = feed.stream()
        assert await take(stream, 1) == [{"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0,
                                          "draining": False, "admitted": []}]
        for i in range(20):  # 20 snapshots in a burst: one or two updates, every id exactly once
            feed.publish({"running": i + 1}, [(f"core{i}", f"d{i}")])
        seen: list[str] = []
        updates = []
        while len(seen) < 20:
            update = (await take(stream, 1))[0]
            updates.append(update)
            seen += update["admitted"]
        assert seen == [f"d{i}" for i in range(20)]
        assert len(updates) <= 2 and updates[-1]["running"] == 20
        await stream.aclose()
        assert feed.watchers == 0

    asyncio.run(main())


def test_first_update_lists_the_admitted_requests_still_in_flight() -> None:
    async def main() -> None:
        feed = make_feed()
        feed.publish({"running": 3}, [("c1", "d1"), ("c2", "d2"), ("c3", "d3")])
        feed.finished("c2")
        stream = feed.stream()
        first = (await take(stream, 1))[0]
        assert first["admitted"] == ["d1", "d3"] and first["running"] == 3
        await stream.aclose()

    asyncio.run(main())


def test_heartbeat_repeats_the_document_when_nothing_changes() -> None:
    async def main() -> None:
        feed = make_feed(heartbeat_s=0.1)
        stream = feed.stream()
        started = time.monotonic()
        updates = await take(stream, 4)
        assert 0.25 <= time.monotonic() - started < 3
        assert all(u == updates[0] for u in updates)
        await stream.aclose()

    asyncio.run(main())


def test_many_ids_go_out_in_bounded_updates() -> None:
    async def main() -> None:
        feed = make_feed(min_interval_s=0.2)
        stream = feed.stream()
        await take(stream, 1)
        count = MAX_ADMITTED_PER_UPDATE * 2 + 5
        feed.publish({"running": count}, [(f"c{i}", f"d{i}") for i in range(count)])
        updates = await take(stream, 3)
        assert [len(u["admitted"]) for u in updates] == [MAX_ADMITTED_PER_UPDATE, MAX_ADMITTED_PER_UPDATE, 5]
        assert all(LoadUpdate.parse(u).running == count for u in updates)  # each one valid for the gateway
        await stream.aclose()

    asyncio.run(main())


def test_a_watcher_that_stops_reading_is_cut_and_close_ends_every_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_feed, "MAX_UNSENT_IDS", 10)

    async def main() -> None:
        feed = make_feed()
        slow, live = feed.stream(), feed.stream()
        await take(slow, 1)
        await take(live, 1)
        feed.publish({"running": 11}, [(f"c{i}", f"d{i}") for i in range(11)])  # more than the slow one may owe
        assert feed.watchers == 0  # both owed 11: both cut
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(slow.__anext__(), 5)
        fresh = feed.stream()
        assert len((await take(fresh, 1))[0]["admitted"]) == 11  # a reconnect starts from the full list
        feed.close()
        assert feed.full()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(fresh.__anext__(), 5)

    asyncio.run(main())


class Watch(threading.Thread):
    """Reads an engine's `/load?watch=1` stream into a list of updates."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.updates: list[tuple[float, dict[str, Any]]] = []
        self.content_type = ""
        self.stop = False

    def run(self) -> None:
        with httpx.stream("GET", f"{self.url}/load?watch=1", timeout=30) as response:
            self.content_type = response.headers["content-type"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.updates.append((time.monotonic(), json.loads(line[6:])))
                if self.stop:
                    return

    def find(self, dispatch_id: str) -> dict[str, Any] | None:
        return next((u for _, u in self.updates if dispatch_id in u["admitted"]), None)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_engine_lists_each_admitted_dispatch_in_an_update_that_counts_it(tiny_engine: EngineProcess,
                                                                         tiny_qwen3_dir: Path) -> None:
    model = tiny_qwen3_dir.name
    watch = Watch(tiny_engine.url)
    watch.start()
    wait_until(lambda: watch.updates, 30, "the first update")
    assert watch.content_type.startswith("text/event-stream")
    first = LoadUpdate.parse(watch.updates[0][1])
    assert first.max_num_seqs is not None and first.admitted == []

    body = {"model": model, "prompt": "Hello there", "max_tokens": 48, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_engine.url}/v1/completions", json=body, timeout=60,
                      headers={DISPATCH_HEADER: "gw1-attempt.7"}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # generating
        wait_until(lambda: watch.find("gw1-attempt.7"), 10, "the update that lists the dispatch")
        listed = LoadUpdate.parse(watch.find("gw1-attempt.7"))
        assert listed.running + listed.waiting == 1 and listed.pending_tokens > 0  # the counts include it
        for _ in lines:
            pass
    wait_until(lambda: watch.updates[-1][1]["running"] == 0, 10, "an update after the request finished")
    assert sum(u["admitted"].count("gw1-attempt.7") for _, u in watch.updates) == 1

    for bad in ("has space", "x" * 65, "é".encode()):  # not a dispatch id: served, never listed
        headers = {DISPATCH_HEADER: bad}
        answer = httpx.post(f"{tiny_engine.url}/v1/completions", timeout=60, headers=headers,
                            json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200
    time.sleep(0.05)
    assert all(bad not in u["admitted"] for _, u in watch.updates for bad in ("has space", "x" * 65))

    idle_from = len(watch.updates)  # idle: heartbeats about every second, no more
    time.sleep(2.5)
    idle = watch.updates[idle_from:]
    assert 1 <= len(idle) <= 4, [t for t, _ in idle]
    watch.stop = True
