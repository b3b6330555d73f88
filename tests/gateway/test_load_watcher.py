"""The gateway's load watcher against fake engines on loopback: a pushed stream absorbs tickets by dispatch id, an
engine without a stream is polled, and a silent, broken or oversized stream is cut, counted and left stale."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from pypto_serving.gateway import load_watcher
from pypto_serving.gateway.breaker import BreakerConfig
from pypto_serving.gateway.load_watcher import MAX_EVENT_BYTES, LoadWatcher
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.replicas import Registry, Replica

DOC = {"running": 1, "waiting": 0, "pending_tokens": 70, "kv_cache_usage": 0.1, "draining": False,
       "max_num_seqs": 4}


def event(**fields: Any) -> bytes:
    return b"data: " + json.dumps({**DOC, **fields}).encode() + b"\n\n"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/load", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def watched(handler: Handler, stale_after_s: float = 2.0,
                  failures: int = 100) -> tuple[LoadWatcher, Replica, web.AppRunner, GatewayMetrics]:
    runner, url = await serve(handler)
    registry = Registry(BreakerConfig(failures=failures))
    metrics = GatewayMetrics()
    watcher = LoadWatcher(registry, metrics, interval_s=0.02, timeout_s=1.0, stale_after_s=stale_after_s)
    await watcher.start()
    return watcher, registry.upsert("e", url), runner, metrics


def failures(metrics: GatewayMetrics) -> float:
    return metrics.poll_failures.labels("e")._value.get()


def test_a_pushed_update_absorbs_exactly_the_listed_dispatches() -> None:
    release = asyncio.Event()

    async def engine(request: web.Request) -> web.StreamResponse:
        assert request.query.get("watch") == "1"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event(admitted=[]))
        await release.wait()
        await response.write(b": a comment line\n\n" + event(running=2, pending_tokens=95, admitted=["x1", "zz"]))
        await asyncio.sleep(30)
        return response

    async def main() -> None:
        watcher, replica, runner, _ = await watched(engine)
        try:
            await until(lambda: replica.load_source == "watch", 5, "the stream")
            first, second = replica.dispatch(25, dispatch_id="x1"), replica.dispatch(40, dispatch_id="x2")
            assert replica.pending_tokens(2.0) == 70 + 25 + 40
            release.set()
            await until(lambda: replica.reading.running == 2, 5, "the second update")
            assert replica.unabsorbed == 1 and replica.pending_tokens(2.0) == 95 + 40  # x1 in the engine's count
            first.end()
            second.end()
        finally:
            await watcher.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_an_engine_without_a_stream_is_polled_and_its_stream_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_watcher, "REWATCH_S", 0.3)
    polls = 0
    upgraded = False

    async def engine(request: web.Request) -> web.StreamResponse:
        nonlocal polls
        if upgraded and request.query.get("watch") == "1":  # e.g. a newer engine at the same address
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(event(running=99))
            await asyncio.sleep(30)
            return response
        polls += 1
        return web.json_response({**DOC, "running": polls})

    async def main() -> None:
        nonlocal upgraded
        watcher, replica, runner, metrics = await watched(engine)
        try:
            await until(lambda: polls >= 5, 5, "polls")
            assert replica.load_source == "poll" and replica.reading.running >= 4 and failures(metrics) == 0
            upgraded = True
            await until(lambda: replica.load_source == "watch", 5, "the stream, tried again")
            assert replica.reading.running == 99
        finally:
            await watcher.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_a_silent_stream_is_cut_and_its_reading_goes_stale() -> None:
    connections = 0

    async def engine(request: web.Request) -> web.StreamResponse:
        nonlocal connections
        connections += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if connections == 1:
            await response.write(event())
        await asyncio.sleep(30)  # hangs: no heartbeat
        return response

    async def main() -> None:
        watcher, replica, runner, metrics = await watched(engine, stale_after_s=0.3)
        try:
            await until(lambda: replica.reading is not None, 5, "the first update")
            await until(lambda: failures(metrics) >= 1, 5, "the cut")
            assert replica.breaker.consecutive_failures >= 1
            await until(lambda: connections >= 2, 5, "a new stream")
            await until(lambda: replica.fresh_reading(0.3) is None, 5, "the reading to go stale")
            assert replica.load_source == "none"  # silent past the bound: unknown, not idle
        finally:
            await watcher.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_a_stream_that_breaks_the_contract_is_cut_and_counted() -> None:
    bodies = [event(running=-1), b"data: {not json\n\n", b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n",
              event(admitted=["bad id!"]), event(admitted=[f"d{i}" for i in range(300)])]

    served = 0

    async def engine(request: web.Request) -> web.StreamResponse:
        nonlocal served
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(bodies[min(len(bodies) - 1, served)])
        served += 1
        await asyncio.sleep(30)
        return response

    async def main() -> None:
        runner, url = await serve(engine)
        registry, metrics = Registry(BreakerConfig(failures=100)), GatewayMetrics()
        watcher = LoadWatcher(registry, metrics, interval_s=0.01, stale_after_s=5)
        await watcher.start()
        replica = registry.upsert("e", url)
        try:
            await until(lambda: failures(metrics) >= len(bodies), 10, "every bad stream counted")
            assert replica.reading is None and replica.load_source == "none"
            assert replica.breaker.consecutive_failures >= len(bodies)
        finally:
            await watcher.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_an_unreachable_engine_is_ejected_and_load_watch_off_polls() -> None:
    async def main() -> None:
        registry, metrics = Registry(BreakerConfig(failures=3, backoff_s=60)), GatewayMetrics()
        watcher = LoadWatcher(registry, metrics, interval_s=0.01)
        await watcher.start()
        replica = registry.upsert("e", "http://127.0.0.1:9")
        try:
            await until(lambda: replica.state() == "ejected", 10, "the ejection")
        finally:
            await watcher.stop()

        async def engine(request: web.Request) -> web.StreamResponse:
            assert "watch" not in request.query
            return web.json_response(DOC)

        runner, url = await serve(engine)
        registry = Registry()
        polling = LoadWatcher(registry, GatewayMetrics(), interval_s=0.01, watch=False)
        await polling.start()
        replica = registry.upsert("p", url)
        try:
            await until(lambda: replica.reading is not None, 5, "a poll")
            assert replica.load_source == "none"  # never watched
        finally:
            await polling.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_an_engine_that_comes_up_during_its_back_off_is_ready_once_the_back_off_ends() -> None:
    """A starting engine refuses connections (ejected), then streams before its back-off is over: the updates that
    follow close the breaker (it does not stay half-open waiting for traffic that a not-ready replica never gets)."""
    import socket

    async def engine(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(event())
            await asyncio.sleep(0.05)  # heartbeats

    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        registry, metrics = Registry(BreakerConfig(failures=1, backoff_s=1.0)), GatewayMetrics()
        watcher = LoadWatcher(registry, metrics, interval_s=0.01)
        await watcher.start()
        replica = registry.upsert("e", f"http://127.0.0.1:{port}")
        runner = None
        try:
            await until(lambda: replica.state() == "ejected", 5, "the ejection while the engine starts")
            app = web.Application()
            app.router.add_get("/load", engine)
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await until(lambda: replica.load_source == "watch", 5, "the stream")
            await until(lambda: replica.state() == "ready", 5, "the breaker to close after the back-off")
        finally:
            await watcher.stop()
            if runner is not None:
                await runner.cleanup()

    asyncio.run(main())
