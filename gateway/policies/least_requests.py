"""`least-requests`: the replica with the fewest running + waiting requests (engine reading + local extra)."""

from __future__ import annotations

from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


class LeastRequests(Policy):
    """Least outstanding requests, ties at random."""

    name = "least-requests"

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        stale = self.config.stale_after_s
        return self.pick_min(candidates, lambda r: r.requests(stale, now))
