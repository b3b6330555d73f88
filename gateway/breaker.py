"""Per-replica circuit breaker: consecutive failures eject a replica for an exponential back-off.

States: *closed* (traffic flows, failures counted), *open* (ejected until the back-off ends), *half-open*
(back-off over: traffic flows again; the next success closes the breaker, the next failure re-ejects it with
the back-off doubled up to a maximum). Failures are upstream connection errors, timeouts and 5xx answers other
than 503, and failed ``/load`` polls; successes are answered requests and polls.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of every replica's breaker."""

    failures: int = 3  # consecutive failures that eject a closed replica
    backoff_s: float = 1.0  # first ejection
    max_backoff_s: float = 30.0


class Breaker:
    """The breaker of one replica; times are monotonic seconds passed in by the caller."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.consecutive_failures = 0
        self.ejections = 0  # ejections since the breaker last closed (sets the back-off)
        self.open_until: float | None = None

    def allows(self, now: float) -> bool:
        """May traffic go to this replica now (closed or half-open)?"""
        return self.open_until is None or now >= self.open_until

    def half_open(self, now: float) -> bool:
        """Back-off over but not yet proven healthy again."""
        return self.open_until is not None and now >= self.open_until

    def success(self, now: float) -> None:
        """A request or poll succeeded: close the breaker (unless it is ejected and its back-off still runs)."""
        if self.open_until is not None and now < self.open_until:
            return
        self.consecutive_failures = 0
        self.ejections = 0
        self.open_until = None

    def failure(self, now: float) -> bool:
        """Record a failure; return True when this failure ejects the replica."""
        if self.open_until is not None and now < self.open_until:
            return False  # already ejected: nothing new
        self.consecutive_failures += 1
        if self.half_open(now) or self.consecutive_failures >= self.config.failures:
            backoff = min(self.config.backoff_s * (2**self.ejections), self.config.max_backoff_s)
            self.ejections += 1
            self.open_until = now + backoff
            self.consecutive_failures = 0
            return True
        return False
