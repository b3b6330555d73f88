"""Replica registry: each engine replica's address, eligibility, last load reading, local accounting, breaker.

Load accounting counts every request this gateway sent exactly once: in the engine's reading once the engine has
admitted it, in the gateway's local extra (``unabsorbed``, at its estimated pending tokens) before.

With the pushed load (``GET /load?watch=1``, gateway/load_watcher.py) this is exact: every attempt carries a
dispatch id (``x-pypto-dispatch``), each update lists the ids the engine admitted, and its counts include those
requests. A listed ticket leaves the local extra (`Replica.pushed`); an unlisted one stays in it until it is
listed or ends, in whatever order the two happen.

Polling (engines that do not stream their load) closes the gap between two polls of ``/load`` by time instead:

* at dispatch a request's estimated pending tokens (prompt estimate + max_tokens) are added to the
  replica's ``unabsorbed`` extra;
* the extra is removed once the engine has accepted the request (first response bytes; for a non-streaming
  request, which answers only at the end, the moment its body was handed over plus an admission margin) *and*
  a ``/load`` reading requested after that moment has arrived, since that reading counts the request itself;
  or when the request ends, whichever comes first.

So a request is counted by the engine's reading or by the local extra, never by both for longer than one poll
round trip, and never by neither. Readings older than ``stale_after`` are ignored and the replica is scored from
local state only (every in-flight request of this gateway at its estimate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from pypto_serving.contract import LoadReport
from pypto_serving.gateway.breaker import Breaker, BreakerConfig

Clock = Callable[[], float]

# A non-streaming request shows no bytes before it finishes; the engine admits a fully received request
# within a few milliseconds, so a reading requested this long after dispatch counts it.
ADMIT_MARGIN_S = 0.005
KV_FULL = 0.95  # KV-cache usage above which a new request would wait for blocks, free batch slot or not


@dataclass(frozen=True)
class LoadReading:
    """One ``/load`` answer of an engine and when it was requested (monotonic seconds)."""

    running: int = 0
    waiting: int = 0
    pending_tokens: int = 0
    kv_cache_usage: float = 0.0
    draining: bool = False
    max_num_seqs: int | None = None  # the engine's batch slots (None: not reported)
    running_remaining: tuple[int, ...] = ()  # tokens left of the running requests, smallest first (some engines)
    requested_at: float = 0.0
    received_at: float = 0.0

    @classmethod
    def from_json(cls, data: object, requested_at: float, received_at: float) -> LoadReading:
        """Build a reading from the engine's JSON, validated as the contract's ``LoadReport`` (missing fields
        read as zero); ValueError when the engine's answer breaks the contract."""
        return cls.from_report(LoadReport.parse(data), requested_at, received_at)

    @classmethod
    def from_report(cls, report: LoadReport, requested_at: float, received_at: float) -> LoadReading:
        """Build a reading from a validated report (or pushed update)."""
        return cls(running=report.running, waiting=report.waiting, pending_tokens=report.pending_tokens,
                   kv_cache_usage=report.kv_cache_usage, draining=report.draining, max_num_seqs=report.max_num_seqs,
                   running_remaining=tuple(sorted(report.running_remaining or ())), requested_at=requested_at,
                   received_at=received_at)


@dataclass(eq=False, slots=True)
class Ticket:
    """One dispatch of one request to one replica; ends exactly once."""

    replica: Replica = field(repr=False)
    tokens: int
    dispatched_at: float
    dispatch_id: str = ""  # x-pypto-dispatch of this attempt (the pushed load lists it once admitted)
    accepted_at: float | None = None
    absorbed: bool = False
    ended: bool = False

    def accepted(self, now: float | None = None) -> None:
        """The engine sent its first response bytes: the next reading requested after now counts this request."""
        if self.accepted_at is None or (now is not None and now < self.accepted_at):
            self.accepted_at = self.replica.clock() if now is None else now

    def end(self) -> None:
        """The request is over (finished, failed or cancelled): drop every local trace of it."""
        if not self.ended:
            self.ended = True
            self.replica._end(self)


@dataclass(eq=False)
class Replica:
    """One engine replica as this gateway sees it."""

    name: str
    url: str
    clock: Clock = field(default=time.monotonic, repr=False)
    discovery_state: str = "ready"  # from discovery: ready | not-ready | draining (label) | terminating
    load_source: str = "none"  # where readings come from now: "watch" (pushed), "poll", or "none" yet
    breaker: Breaker = field(default_factory=Breaker)
    reading: LoadReading | None = None
    refused_at: float | None = None  # answered 503 (draining / not ready); eligible again after a newer reading
    inflight: int = 0
    inflight_tokens: int = 0
    unabsorbed: int = 0  # requests dispatched but not yet in a reading
    unabsorbed_tokens: int = 0
    released: int = 0  # requests in the reading that have ended since it arrived (their slots are free)
    _tickets: set[Ticket] = field(default_factory=set, repr=False)
    _by_id: dict[str, Ticket] = field(default_factory=dict, repr=False)

    # --- load -------------------------------------------------------------------------------------------------
    def fresh_reading(self, stale_after: float, now: float | None = None) -> LoadReading | None:
        """The last reading, or None when there is none or it is older than ``stale_after`` seconds."""
        if self.reading is None:
            return None
        now = self.clock() if now is None else now
        return self.reading if now - self.reading.received_at <= stale_after else None

    def pending_tokens(self, stale_after: float, now: float | None = None) -> int:
        """Score for least-pending-tokens: engine reading + local extra, or local state only when stale."""
        reading = self.reading
        if reading is None or (self.clock() if now is None else now) - reading.received_at > stale_after:
            return self.inflight_tokens
        return reading.pending_tokens + self.unabsorbed_tokens

    def requests(self, stale_after: float, now: float | None = None) -> int:
        """Score for least-requests: engine running + waiting + local extra, or local in-flight when stale."""
        reading = self.reading
        if reading is None or (self.clock() if now is None else now) - reading.received_at > stale_after:
            return self.inflight
        return reading.running + reading.waiting + self.unabsorbed

    def slot_balance(self, reading: LoadReading) -> int | None:
        """The engine's batch slots minus its running and waiting requests and this gateway's not admitted yet,
        plus its requests that ended since ``reading``: free slots when positive, else minus the requests queued
        for one. None for an engine that does not report its slots. KV pressure is not counted here."""
        if reading.max_num_seqs is None:
            return None
        running = reading.running - min(self.released, reading.running)
        return reading.max_num_seqs - running - reading.waiting - self.unabsorbed

    def free_slots(self, stale_after: float, now: float | None = None) -> int | None:
        """`slot_balance` of the fresh reading, 0 under KV pressure (may be negative). None when unknown: no fresh
        reading, or an engine that does not report its slots."""
        reading = self.fresh_reading(stale_after, now)
        if reading is None:
            return None
        balance = self.slot_balance(reading)
        if balance is None:
            return None
        return 0 if reading.kv_cache_usage > KV_FULL else balance

    def pushed(self, reading: LoadReading, admitted: Iterable[str]) -> None:
        """Apply an update of the pushed load: its counts include exactly the requests whose dispatch ids it lists
        (ids this gateway does not know, or no longer tracks, are someone else's or finished: ignored)."""
        self.reading = reading
        self.released = 0
        if self.refused_at is not None and reading.received_at > self.refused_at and not reading.draining:
            self.refused_at = None
        by_id = self._by_id
        for dispatch_id in admitted:
            ticket = by_id.get(dispatch_id)
            if ticket is not None:
                self._absorb(ticket)

    def update(self, reading: LoadReading) -> None:
        """Apply a new polled ``/load`` reading: absorb every accepted request it counts."""
        if self.reading is not None and reading.requested_at < self.reading.requested_at:
            return  # an older poll answered late
        self.reading = reading
        self.released = 0
        if self.refused_at is not None and reading.requested_at > self.refused_at and not reading.draining:
            self.refused_at = None
        for ticket in list(self._tickets):
            if ticket.accepted_at is not None and reading.requested_at >= ticket.accepted_at:
                self._absorb(ticket)

    # --- eligibility ------------------------------------------------------------------------------------------
    def eligible(self, now: float | None = None) -> bool:
        """May this replica take a new request now?"""
        if self.discovery_state != "ready" or self.refused_at is not None:
            return False
        if self.reading is not None and self.reading.draining:
            return False
        open_until = self.breaker.open_until  # inlined Breaker.allows: this runs for every replica per request
        return open_until is None or (self.clock() if now is None else now) >= open_until

    def state(self, now: float | None = None) -> str:
        """Human-readable state for /replicas."""
        now = self.clock() if now is None else now
        if self.discovery_state != "ready":
            return self.discovery_state
        if (self.reading is not None and self.reading.draining) or self.refused_at is not None:
            return "draining"
        if not self.breaker.allows(now):
            return "ejected"
        return "half-open" if self.breaker.half_open(now) else "ready"

    def refused(self) -> None:
        """The replica answered 503 before any byte: no new traffic until a newer reading says otherwise."""
        self.refused_at = self.clock()

    # --- accounting -------------------------------------------------------------------------------------------
    def dispatch(self, tokens: int, stream: bool = True, dispatch_id: str = "") -> Ticket:
        """Count a request sent to this replica now; the caller must ``end()`` the returned ticket."""
        now = self.clock()
        ticket = Ticket(self, tokens, now, dispatch_id, accepted_at=None if stream else now + ADMIT_MARGIN_S)
        self._tickets.add(ticket)
        if dispatch_id:
            self._by_id[dispatch_id] = ticket
        self.inflight += 1
        self.inflight_tokens += tokens
        self.unabsorbed += 1
        self.unabsorbed_tokens += tokens
        return ticket

    def _absorb(self, ticket: Ticket) -> None:
        if not ticket.absorbed:
            ticket.absorbed = True
            self.unabsorbed -= 1
            self.unabsorbed_tokens -= ticket.tokens

    def _end(self, ticket: Ticket) -> None:
        if ticket.absorbed:  # the last reading counts it, but it is over: its batch slot is free now
            self.released += 1
        self._absorb(ticket)
        self._tickets.discard(ticket)
        if ticket.dispatch_id:
            self._by_id.pop(ticket.dispatch_id, None)
        self.inflight -= 1
        self.inflight_tokens -= ticket.tokens


class Registry:
    """The set of known replicas, keyed by name (pod name or endpoint URL)."""

    def __init__(self, breaker: BreakerConfig | None = None, clock: Clock = time.monotonic) -> None:
        self.breaker_config = breaker or BreakerConfig()
        self.clock = clock
        self._replicas: dict[str, Replica] = {}
        self.version = 0  # bumped whenever the set of names changes (policies cache hash rings by it)
        self.listeners: list[Callable[[Replica, str], None]] = []  # (replica, "added" | "removed")
        self.on_eject: Callable[[Replica], None] = lambda replica: None
        self.on_capacity: list[Callable[[], None]] = []  # called when a batch slot may have freed somewhere

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self):
        return iter(list(self._replicas.values()))

    def get(self, name: str) -> Replica | None:
        """The replica called ``name``, if known."""
        return self._replicas.get(name)

    def names(self) -> list[str]:
        """Every known replica name, sorted."""
        return sorted(self._replicas)

    def upsert(self, name: str, url: str, state: str = "ready") -> Replica:
        """Add a replica or update its address and discovery state (a new address resets its load state)."""
        replica = self._replicas.get(name)
        if replica is not None and replica.url != url:
            self.remove(name)
            replica = None
        if replica is None:
            replica = Replica(name, url, clock=self.clock, breaker=Breaker(self.breaker_config))
            self._replicas[name] = replica
            self.version += 1
            for listener in self.listeners:
                listener(replica, "added")
        if replica.discovery_state != state:
            replica.discovery_state = state
            self.capacity_changed()
        return replica

    def capacity_changed(self) -> None:
        """A reading arrived, a request ended or a replica changed state: tell whoever waits for a free slot."""
        for listener in self.on_capacity:
            listener()

    def remove(self, name: str) -> None:
        """Forget a replica (its in-flight requests finish on their own)."""
        replica = self._replicas.pop(name, None)
        if replica is not None:
            self.version += 1
            for listener in self.listeners:
                listener(replica, "removed")
            self.capacity_changed()  # with no replica left, requests waiting for a slot get their 503 now

    def replace(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Make the registry hold exactly ``entries`` (name, url, state) — used after a full re-list."""
        wanted = {name: (url, state) for name, url, state in entries}
        for name in list(self._replicas):
            if name not in wanted:
                self.remove(name)
        for name, (url, state) in wanted.items():
            self.upsert(name, url, state)

    def failure(self, replica: Replica) -> None:
        """Count a failed request or poll against ``replica``'s breaker (reporting an ejection)."""
        if replica.breaker.failure(self.clock()):
            self.on_eject(replica)

    def success(self, replica: Replica) -> None:
        """Count a successful request or poll (closes a half-open breaker)."""
        replica.breaker.success(self.clock())

    def eligible(self, exclude: Collection[str] = (), now: float | None = None) -> list[Replica]:
        """Replicas that may take a new request now, minus ``exclude`` (names already tried)."""
        now = self.clock() if now is None else now
        if exclude:
            return [r for r in self._replicas.values() if r.name not in exclude and r.eligible(now)]
        return [r for r in self._replicas.values() if r.eligible(now)]
