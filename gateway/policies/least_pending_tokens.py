"""`least-pending-tokens` (default): among the replicas with a free batch slot (all of them when none has one), the
one with the fewest pending tokens (engine reading + local extra).

Pending tokens alone would send a request to a replica whose slots are all taken by short requests with a queue
behind them rather than to one running a single long request next to a free slot: the request would wait there.
"""

from __future__ import annotations

from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


class LeastPendingTokens(Policy):
    """Free batch slot first, then least pending tokens (prompt tokens not yet computed + tokens still to generate),
    ties at random."""

    name = "least-pending-tokens"

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        stale = self.config.stale_after_s
        free = [r for r in candidates if r.has_free_slot(stale, now)]
        return self.pick_min(free or candidates, lambda r: r.pending_tokens(stale, now))
