"""Circuit breaker: consecutive failures eject with exponential back-off; half-open success closes."""

from __future__ import annotations

from pypto_serving.gateway.breaker import Breaker, BreakerConfig


def test_consecutive_failures_eject_and_back_off_doubles() -> None:
    b = Breaker(BreakerConfig(failures=3, backoff_s=1.0, max_backoff_s=3.0))
    assert not b.failure(0.0) and not b.failure(0.1)
    assert b.failure(0.2)  # third consecutive failure ejects
    assert not b.allows(0.5) and not b.failure(0.6)  # failures while open change nothing
    assert b.allows(1.2) and b.half_open(1.2)
    assert b.failure(1.3)  # half-open: one failure re-ejects, back-off doubled
    assert not b.allows(3.2) and b.allows(3.3)
    assert b.failure(3.4)  # capped at max_backoff_s
    assert not b.allows(6.3) and b.allows(6.4)


def test_success_resets_the_count_and_closes_a_half_open_breaker() -> None:
    b = Breaker(BreakerConfig(failures=2, backoff_s=1.0))
    b.failure(0.0)
    b.success(0.1)
    assert not b.failure(0.2)  # count restarted
    assert b.failure(0.3)
    b.success(0.5)  # still open: a poll success during the back-off does not close it
    assert not b.allows(0.6)
    b.success(1.4)  # half-open success closes
    assert b.allows(1.4) and not b.half_open(1.4) and b.ejections == 0
