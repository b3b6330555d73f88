"""`round-robin`: the candidates in name order, one after the other (load-blind baseline)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


class RoundRobin(Policy):
    """Plain round-robin over the eligible replicas."""

    name = "round-robin"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._counter = itertools.count()

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        ordered = sorted(candidates, key=lambda r: r.name)
        return ordered[next(self._counter) % len(ordered)]
