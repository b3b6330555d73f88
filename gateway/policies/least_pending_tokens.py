"""`least-pending-tokens` (default): the replica with the fewest pending tokens (engine reading + local extra)."""

from __future__ import annotations

from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


class LeastPendingTokens(Policy):
    """Least pending tokens: prompt tokens not yet computed + tokens still to generate, ties at random."""

    name = "least-pending-tokens"

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        stale = self.config.stale_after_s
        return self.pick_min(candidates, lambda r: r.pending_tokens(stale, now))
