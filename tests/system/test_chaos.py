"""One short chaos scenario in `make test` (the full matrix is `make chaos`): SIGKILL an engine process under
a fixed-rate load through the gateway. Only requests in flight on that replica may fail, new requests succeed
within 1 s, and the replica is restarted and serves again."""

from __future__ import annotations

import pytest

from benchmarks.chaos import run_named
from benchmarks.chaos_system import System
from tests.system.conftest import SYSTEM_REPLICAS

pytestmark = pytest.mark.cluster


def test_engine_sigkill_under_load(serving_system: System) -> None:
    result = run_named(serving_system, "engine-kill", rate=4.0, phase_s=4.0, max_tokens=64)

    report = "\n".join(f"[{'ok' if c.passed else 'FAILED'}] {c.name}: {c.detail}" for c in result.checks)
    assert result.error is None, f"{result.error}\n{report}"
    assert [c.name for c in result.checks] == [
        f"only requests in flight on {result.info['victim']} failed", "new requests succeed within 1s",
        "the replica was restarted and rejoined"]
    assert result.passed, report
    before, during, after = result.windows
    assert before.sent >= 8 and before.failed == 0, before  # requests in flight at the kill count as "during"
    assert after.sent >= 8 and after.failed == 0, after
    assert during.sent > 0
    assert serving_system.converged(SYSTEM_REPLICAS)
