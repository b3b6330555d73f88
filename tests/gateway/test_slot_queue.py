"""The gateway's slot queue: requests wait while every batch slot is busy and take the first one that frees."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pypto_serving.gateway.replicas import LoadReading, Registry, Replica
from pypto_serving.gateway.slot_queue import SlotQueue
from tests.gateway.harness import GatewayProcess
from tests.support.common import wait_for


def full(replica: Replica, running: int = 2, waiting: int = 0, slots: int | None = 2, kv: float = 0.1) -> None:
    """Give ``replica`` a fresh pushed reading."""
    now = replica.clock()
    replica.pushed(LoadReading(running=running, waiting=waiting, max_num_seqs=slots, kv_cache_usage=kv,
                               requested_at=now, received_at=now), ())


def two_replicas() -> tuple[Registry, Replica, Replica]:
    registry = Registry()
    return registry, registry.upsert("a", "http://a"), registry.upsert("b", "http://b")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_free_slot_passes_at_once_and_full_replicas_hold_until_one_frees() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=30, max_waiting=10, stale_after_s=2)
        full(a, running=1)
        full(b)
        assert queue.free_slots() == 1
        assert await queue.wait() == 0.0  # a has a free slot
        a.dispatch(10)  # the caller dispatches at once: now every slot is taken
        assert queue.free_slots() == 0
        first = asyncio.create_task(queue.wait())
        second = asyncio.create_task(queue.wait())
        await settle()
        assert len(queue) == 2 and not first.done()
        full(b, running=1)  # one slot frees on b: the oldest waiter goes, the other still waits
        registry.capacity_changed()
        assert queue.free_slots() == 0  # released but not resumed yet: its slot is counted as taken
        await settle()
        assert first.done() and first.result() > 0 and not second.done()
        b.dispatch(10)  # what the proxy does as soon as the wait returns
        full(a, running=0)  # both of a's requests ended (one of them dispatched here, never admitted)
        registry.capacity_changed()
        await settle()
        assert second.done() and len(queue) == 0

    asyncio.run(scenario())


def test_a_new_request_queues_behind_waiting_ones_even_if_a_slot_frees() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=30, max_waiting=10, stale_after_s=2)
        full(a)
        full(b)
        first = asyncio.create_task(queue.wait())
        await settle()
        full(a, running=1)  # a reading shows a free slot, before anyone was told
        late = asyncio.create_task(queue.wait())
        await settle()
        assert not late.done()  # it does not jump the queue
        registry.capacity_changed()
        await settle()
        assert first.done() and not late.done()
        late.cancel()

    asyncio.run(scenario())


def test_unknown_slots_no_replica_or_a_full_queue_never_hold() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=30, max_waiting=1, stale_after_s=2)
        assert queue.free_slots() is None and await queue.wait() == 0.0  # no readings yet
        full(a)
        full(b, slots=None)  # an engine that does not report its slots
        assert await queue.wait() == 0.0
        full(b)
        holder = asyncio.create_task(queue.wait())
        await settle()
        assert len(queue) == 1
        assert await queue.wait() == 0.0  # max_waiting reached: straight to an engine's queue
        full(b, kv=0.99)  # KV pressure: a slot that would wait for blocks is no free slot
        full(a, running=1, kv=0.99)
        registry.capacity_changed()
        await settle()
        assert not holder.done()
        a.breaker.open_until = a.clock() + 60  # both ejected: nothing eligible, the proxy answers 503 at once
        b.refused()
        registry.capacity_changed()
        await settle()
        assert holder.done()
        a.breaker.open_until = None
        b.refused_at = None
        waiting = asyncio.create_task(queue.wait())
        await settle()
        assert not waiting.done()
        registry.remove("a")
        assert not waiting.done()
        registry.remove("b")  # the last replica gone: the proxy answers 503 at once rather than after the wait
        await settle()
        assert waiting.done()
        disabled = SlotQueue(registry, max_wait_s=0, max_waiting=10, stale_after_s=2)
        assert await disabled.wait() == 0.0

    asyncio.run(scenario())


def test_engine_queue_depth_lets_each_replica_queue_that_many_before_the_gateway_holds() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=30, max_waiting=10, stale_after_s=2, engine_queue_depth=1)
        full(a)
        full(b, waiting=1)
        assert queue.free_slots() == 1 and await queue.wait() == 0.0  # a may queue one
        a.dispatch(10)
        held = asyncio.create_task(queue.wait())
        await settle()
        assert not held.done()  # every replica has its one queued request
        full(b)  # b admitted its queued request (a slot freed there): room for one more in its queue
        registry.capacity_changed()
        await settle()
        assert held.done()

    asyncio.run(scenario())


def test_a_request_waits_at_most_max_wait() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=0.05, max_waiting=10, stale_after_s=60)
        full(a)
        full(b)
        waited = await asyncio.wait_for(queue.wait(), 5)
        assert waited >= 0.05 and queue.expired == 1 and len(queue) == 0

    asyncio.run(scenario())


def test_a_client_gone_while_released_hands_its_slot_to_the_next() -> None:
    async def scenario() -> None:
        registry, a, b = two_replicas()
        queue = SlotQueue(registry, max_wait_s=30, max_waiting=10, stale_after_s=2)
        full(a)
        full(b)
        gone = asyncio.create_task(queue.wait())
        cancelled_early = asyncio.create_task(queue.wait())
        after = asyncio.create_task(queue.wait())
        await settle()
        cancelled_early.cancel()  # a client that left before any slot freed
        await settle()
        assert len(queue) == 2
        full(a, running=1)
        registry.capacity_changed()  # releases `gone` ...
        gone.cancel()  # ... whose client leaves before it could dispatch
        assert queue.free_slots() == 0  # `gone` holds the one free slot until it resumes
        await settle()
        assert gone.cancelled() and after.done() and len(queue) == 0

    asyncio.run(scenario())


def test_requests_wait_at_the_gateway_while_the_engine_slot_is_busy(
        tiny_qwen3_dir: Path, engine_factory, gateway_factory: Callable[..., GatewayProcess]) -> None:
    """A real engine with one batch slot: a second request waits in the gateway, not in the engine's queue, and
    is served as soon as the slot frees; a client that leaves while waiting is simply dropped."""
    engine = engine_factory(tiny_qwen3_dir, extra_args=["--max-model-len", "4096", "--max-num-seqs", "1",
                                                        "--cpu-threads", "1"])
    gw = gateway_factory("--endpoints", engine.url)
    load = lambda: httpx.get(engine.url + "/load", timeout=5).json()  # noqa: E731
    long_body = {"prompt": "hold the slot", "stream": True, "max_tokens": 4000, "ignore_eos": True,
                 "temperature": 0}
    answers: list[httpx.Response] = []
    with httpx.stream("POST", gw.url + "/v1/completions", json=long_body, timeout=60) as stream:
        chunks = stream.iter_raw()  # keep a reference: a collected iterator closes the stream
        next(chunks)
        wait_for(lambda: gw.replicas()[engine.url]["load"]["running"] == 1, 10, "the gateway sees the busy slot")
        waiter = threading.Thread(target=lambda: answers.append(httpx.post(
            gw.url + "/v1/completions", json={"prompt": "next", "max_tokens": 3, "temperature": 0}, timeout=60)))
        waiter.start()
        wait_for(lambda: gw.metric("pypto_gateway_queued_requests") == 1, 10, "the request waits at the gateway")
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up while waiting
            httpx.post(gw.url + "/v1/completions", json={"prompt": "gone", "max_tokens": 3}, timeout=0.5)
        wait_for(lambda: gw.metric("pypto_gateway_queued_requests") == 1, 10, "the one that left is dropped")
        now = load()
        assert (now["running"], now["waiting"]) == (1, 0)  # not in the engine's queue
        assert not answers
    waiter.join(60)  # the long stream closed: the engine aborts it, its slot frees, the waiting request goes
    assert [r.status_code for r in answers] == [200] and answers[0].json()["usage"]["completion_tokens"] == 3
    assert answers[0].headers["x-pypto-replica"] == engine.url
    assert gw.metric("pypto_gateway_queue_wait_seconds_count") == 1
    assert gw.metric("pypto_gateway_queued_requests") == 0 and gw.metric("pypto_gateway_queue_expired_total") == 0
    assert gw.replicas()[engine.url]["inflight"] == 0
