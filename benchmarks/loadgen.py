"""A fixed-rate, open-loop load generator that records every request's outcome (for the chaos scenarios).

Requests are sent at ``rate`` per second on a fixed schedule whatever the server does (open loop: a slow or
failing server does not slow the sender down), spread round-robin over the target URLs. Each is a streamed
``/v1/completions`` call; it succeeds only with HTTP 200, a complete SSE stream ending in ``data: [DONE]`` and
no error event. There are no client-side retries: what is recorded is what a user sees (the gateway's own
retry-before-first-byte is part of the system under test). Timestamps are wall-clock (``time.time()``) so they
can be compared with the moments faults were injected.

    load = LoadGenerator(["http://127.0.0.1:8080"], model="tiny", rate=5).start()
    ...  # inject a fault
    outcomes = load.stop()
    print(summarize(outcomes, lo, hi))
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class Outcome:
    """One request as the client saw it."""

    id: int
    target: str  # base URL it was sent to
    start: float  # wall clock
    end: float
    ok: bool
    status: int | None = None
    error: str | None = None  # what went wrong (None when ok)
    replica: str | None = None  # x-pypto-replica of the answer
    ttft: float | None = None  # seconds to the first SSE data chunk

    @property
    def latency(self) -> float:
        """End-to-end seconds."""
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` (0..100) percentile by the nearest-rank method (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Window:
    """Requests that started inside one time window."""

    name: str
    start: float
    end: float
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def summarize(outcomes: Iterable[Outcome], name: str, start: float, end: float,
              select: Callable[[Outcome], bool] | None = None) -> Window:
    """Counts and latency percentiles (of successful requests) of the requests started in [start, end), or of
    those ``select`` picks."""
    chosen = [o for o in outcomes if (select(o) if select is not None else start <= o.start < end)]
    latencies = [o.latency for o in chosen if o.ok]
    errors = Counter((o.error or "").split(":")[0] for o in chosen if not o.ok)
    return Window(name, start, end, len(chosen), len(latencies), len(chosen) - len(latencies),
                  percentile(latencies, 50), percentile(latencies, 99), dict(errors))


class LoadGenerator:
    """Runs the open-loop load in a background thread with its own event loop."""

    def __init__(self, targets: Sequence[str], *, model: str, rate: float = 5.0, max_tokens: int = 16,
                 prompt: str = "The quick brown fox jumps over the lazy dog. " * 4, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        if not targets:
            raise ValueError("no targets")
        self.targets, self.model, self.rate = list(targets), model, rate
        self.max_tokens, self.prompt, self.api_key, self.timeout = max_tokens, prompt, api_key, timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = 0.0

    # -- control (any thread) -----------------------------------------------------------------------------------
    def start(self) -> LoadGenerator:
        """Start sending; returns at once."""
        self.started_at = time.time()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="loadgen", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the requests in flight (at most ``timeout``), return every outcome by id."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 30)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        """The outcomes recorded so far."""
        with self._lock:
            return sorted(self.outcomes, key=lambda o: o.id)

    # -- the loop -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=5.0), limits=limits,
                                     headers=headers, trust_env=False) as client:
            tasks: set[asyncio.Task[None]] = set()
            begin = time.monotonic()
            n = 0
            while not self._stopping.is_set():
                due = begin + n / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.2))
                    continue
                task = asyncio.create_task(self._one(client, n, self.targets[n % len(self.targets)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout + 5)

    async def _one(self, client: httpx.AsyncClient, rid: int, target: str) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0}
        start, mono = time.time(), time.monotonic()
        outcome = Outcome(rid, target, start, start, ok=False)
        try:
            async with client.stream("POST", f"{target}/v1/completions", json=body) as response:
                outcome.status = response.status_code
                outcome.replica = response.headers.get("x-pypto-replica")
                if response.status_code != 200:
                    await response.aread()
                    outcome.error = f"http {response.status_code}: {response.text[:200]}"
                else:
                    done = False
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if outcome.ttft is None:
                            outcome.ttft = time.monotonic() - mono
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                        elif '"error"' in data and "error" in json.loads(data):
                            outcome.error = f"error event: {data[:200]}"
                    if outcome.error is None and not done:
                        outcome.error = "truncated: the stream ended without [DONE]"
                    outcome.ok = outcome.error is None
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # never lose an outcome
            outcome.error = f"{type(exc).__name__}: {exc}"[:300]
        outcome.end = start + (time.monotonic() - mono)
        with self._lock:
            self.outcomes.append(outcome)
