"""Local load accounting of a replica: dispatch adds, acceptance + a newer reading absorbs, end removes."""

from __future__ import annotations

from pypto_serving.gateway.replicas import ADMIT_MARGIN_S, LoadReading, Registry, Replica


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reading(clock: Clock, pending: int, running: int = 0, waiting: int = 0, draining: bool = False,
            requested_at: float | None = None) -> LoadReading:
    at = clock.now if requested_at is None else requested_at
    return LoadReading(running=running, waiting=waiting, pending_tokens=pending, draining=draining,
                       requested_at=at, received_at=clock.now)


def test_dispatch_counts_locally_until_a_reading_after_acceptance() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    r.update(reading(clock, pending=100, running=1))
    ticket = r.dispatch(50, stream=True)
    assert r.pending_tokens(2.0) == 150 and r.requests(2.0) == 2
    clock.now += 0.01
    r.update(reading(clock, pending=100, running=1))  # requested before acceptance: does not count the request
    assert r.pending_tokens(2.0) == 150
    ticket.accepted()  # first response bytes
    assert r.pending_tokens(2.0) == 150  # not dropped yet: the last reading predates acceptance
    clock.now += 0.01
    r.update(reading(clock, pending=150, running=2))  # requested after acceptance: the engine counts it now
    assert r.pending_tokens(2.0) == 150 and r.requests(2.0) == 2  # counted once, not twice
    ticket.end()
    assert r.inflight == 0 and r.unabsorbed_tokens == 0 and r.inflight_tokens == 0


def test_end_before_absorption_removes_the_extra_once() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    ticket = r.dispatch(40)
    ticket.end()
    ticket.end()
    clock.now += 1
    r.update(reading(clock, pending=0))
    assert (r.inflight, r.inflight_tokens, r.unabsorbed, r.unabsorbed_tokens) == (0, 0, 0, 0)


def test_non_streaming_request_is_absorbed_after_the_admission_margin() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    ticket = r.dispatch(30, stream=False)
    r.update(reading(clock, pending=0, requested_at=clock.now + ADMIT_MARGIN_S / 2))
    assert r.unabsorbed_tokens == 30
    clock.now += 2 * ADMIT_MARGIN_S
    r.update(reading(clock, pending=30))
    assert r.unabsorbed_tokens == 0 and r.pending_tokens(2.0) == 30 and r.inflight_tokens == 30
    ticket.end()


def test_stale_reading_scores_from_local_state_only() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    r.update(reading(clock, pending=5000, running=9))
    t1 = r.dispatch(10)
    t1.accepted()
    clock.now += 0.05
    r.update(reading(clock, pending=5010, running=10))
    assert r.pending_tokens(2.0) == 5010
    clock.now += 2.5  # no reading for 2.5 s: stale
    assert r.fresh_reading(2.0) is None
    assert r.pending_tokens(2.0) == 10 and r.requests(2.0) == 1


def test_late_older_reading_is_ignored() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    r.update(reading(clock, pending=10, requested_at=clock.now))
    r.update(reading(clock, pending=999, requested_at=clock.now - 1))
    assert r.reading is not None and r.reading.pending_tokens == 10


def test_draining_reading_and_503_make_a_replica_ineligible_until_a_newer_reading() -> None:
    clock = Clock()
    reg = Registry(clock=clock)
    a, b = reg.upsert("a", "http://a"), reg.upsert("b", "http://b")
    a.update(reading(clock, pending=0, draining=True))
    assert [r.name for r in reg.eligible()] == ["b"] and a.state() == "draining"
    b.refused()
    assert reg.eligible() == []
    clock.now += 0.05
    b.update(reading(clock, pending=0))
    a.update(reading(clock, pending=0))
    assert {r.name for r in reg.eligible()} == {"a", "b"}


def test_registry_replace_and_readiness() -> None:
    reg = Registry()
    reg.replace([("a", "http://a", "ready"), ("b", "http://b", "not-ready")])
    assert reg.names() == ["a", "b"] and [r.name for r in reg.eligible()] == ["a"]
    version = reg.version
    reg.replace([("b", "http://b", "ready")])
    assert reg.names() == ["b"] and reg.version > version
    assert [r.name for r in reg.eligible(exclude=["b"])] == []
    old = reg.get("b")
    reg.upsert("b", "http://b2")  # a new address is a new replica
    assert reg.get("b") is not old and reg.get("b").url == "http://b2"


# --- pushed load (GET /load?watch=1): absorption by dispatch id -----------------------------------------------------

def pushed(r: Replica, clock: Clock, pending: int, running: int, admitted: tuple[str, ...] = ()) -> None:
    r.pushed(reading(clock, pending=pending, running=running), admitted)


def test_pushed_dispatch_then_admitted_then_end() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    pushed(r, clock, 100, 1)
    ticket = r.dispatch(50, stream=True, dispatch_id="d1")
    assert r.pending_tokens(2.0) == 150  # not admitted yet: local estimate on top of the reading
    pushed(r, clock, 100, 1)  # an update that does not list it: still counted locally
    assert r.pending_tokens(2.0) == 150 and r.unabsorbed == 1
    ticket.accepted()  # first bytes: irrelevant with pushed load, only the listing absorbs
    pushed(r, clock, 100, 1)
    assert r.unabsorbed == 1
    pushed(r, clock, 162, 2, ("d1",))  # the engine's own count of it (62 tokens) replaces the estimate
    assert r.pending_tokens(2.0) == 162 and r.requests(2.0) == 2 and r.unabsorbed == 0
    pushed(r, clock, 162, 2, ("d1",))  # listed again (a reconnect's full list): counted once still
    assert r.pending_tokens(2.0) == 162
    ticket.end()
    assert r.inflight == 0 and r.unabsorbed_tokens == 0 and r.inflight_tokens == 0 and not r._by_id


def test_pushed_end_before_admitted_and_unknown_ids_are_ignored() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    pushed(r, clock, 0, 0)
    ticket = r.dispatch(40, stream=False, dispatch_id="d1")
    other = r.dispatch(30, stream=True, dispatch_id="d2")
    ticket.end()  # e.g. the client went away before the engine admitted it
    assert r.unabsorbed == 1 and r.unabsorbed_tokens == 30
    pushed(r, clock, 0, 0, ("d1", "someone-elses", "d2"))  # d1 finished, d2 admitted (and already done)
    assert r.unabsorbed == 0 and r.pending_tokens(2.0) == 0
    other.end()
    assert r.inflight == 0 and r.inflight_tokens == 0 and r.unabsorbed_tokens == 0


def test_pushed_admitted_in_another_order_than_dispatched() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    tickets = [r.dispatch(10 * (i + 1), dispatch_id=f"d{i}") for i in range(3)]
    pushed(r, clock, 30, 1, ("d2",))
    assert r.unabsorbed == 2 and r.pending_tokens(2.0) == 30 + 10 + 20
    tickets[0].end()
    pushed(r, clock, 50, 2, ("d1",))
    assert r.unabsorbed == 0 and r.pending_tokens(2.0) == 50
    for ticket in tickets:
        ticket.end()
        ticket.end()  # idempotent
    assert r.inflight == 0 and r.inflight_tokens == 0 and r.unabsorbed_tokens == 0


def test_pushed_silence_makes_the_reading_stale() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    pushed(r, clock, 500, 2)
    r.dispatch(20, dispatch_id="d1")
    assert r.pending_tokens(2.0) == 520
    clock.now += 2.5  # no update or heartbeat for longer than the bound
    assert r.fresh_reading(2.0) is None and r.pending_tokens(2.0) == 20


def test_pushed_draining_and_refusal() -> None:
    clock = Clock()
    r = Replica("a", "http://a", clock=clock)
    r.pushed(reading(clock, 0, draining=True), ())
    assert not r.eligible()
    clock.now += 0.01
    r.pushed(reading(clock, 0), ())
    assert r.eligible()
    r.refused()
    r.pushed(reading(clock, 0), ())  # received at the same instant: not newer than the refusal
    assert not r.eligible()
    clock.now += 0.01
    r.pushed(reading(clock, 0), ())
    assert r.eligible()
