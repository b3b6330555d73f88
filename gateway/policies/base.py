"""The routing policy interface: pick one replica among the eligible candidates for one request."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


@dataclass(frozen=True)
class PolicyConfig:
    """Tunables shared by the policies."""

    stale_after_s: float = 2.0  # a /load reading older than this is ignored (local state only)
    balance_epsilon: float = 0.25  # bounded loads: no replica above (1 + epsilon) x mean load (+ slack)
    balance_slack_tokens: int = 4096  # keeps affinity at light load, where the mean is near zero
    prefix_block_chars: int = 256  # prefix hashing: block size in characters (~64 tokens)
    prefix_blocks: int = 4  # the leading blocks that make the prefix key
    virtual_nodes: int = 160  # points per replica on the hash ring


class Policy(ABC):
    """One routing policy. ``select`` gets a non-empty list of eligible replicas and returns one of them."""

    name: str = ""

    def __init__(self, config: PolicyConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or PolicyConfig()
        self.rng = rng or random.Random()

    @abstractmethod
    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        """Choose the replica that serves ``request`` (``candidates`` is non-empty)."""

    def pick_min(self, candidates: Sequence[Replica], score: Callable[[Replica], Any]) -> Replica:
        """The candidate with the lowest score (a number, or a tuple compared in order), ties broken at random."""
        best: list[Replica] = []
        best_score: Any = None
        for replica in candidates:
            value = score(replica)
            if best_score is None or value < best_score:
                best, best_score = [replica], value
            elif value == best_score:
                best.append(replica)
        return best[0] if len(best) == 1 else self.rng.choice(best)
