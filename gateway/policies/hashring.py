"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018), shared by the affinity policies.

Every replica owns ``virtual_nodes`` points on a 64-bit ring, placed by a stable hash of its name, so every
gateway replica builds the same ring from the same replica names without shared state. A key is hashed onto
the ring and the walk goes clockwise to the first replica whose load stays within the bound

    load <= (1 + epsilon) * (total load + this request) / n + slack

(loads in pending tokens, as for least-pending-tokens). The least loaded replica always fits, so the walk ends.
``slack`` keeps requests on their replica at light load, where the mean is near zero; 0 gives the strict bound.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import Replica
from pypto_serving.gateway.request import RequestInfo


def stable_hash(data: str | bytes) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash()``)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class HashRing:
    """Immutable ring over a set of replica names."""

    def __init__(self, names: Sequence[str], virtual_nodes: int) -> None:
        points = sorted((stable_hash(f"{name}#{i}"), name) for name in names for i in range(virtual_nodes))
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]
        self.size = len(set(names))

    def walk(self, key: int):
        """Yield each distinct replica name in ring order starting at ``key``'s position."""
        if not self._names:
            return
        start = bisect.bisect_left(self._hashes, key)
        seen: set[str] = set()
        count = len(self._names)
        for i in range(count):
            name = self._names[(start + i) % count]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == self.size:
                    return


class BoundedHashPolicy(Policy):
    """Base of the affinity policies: subclasses say which key a request hashes to (None = no affinity)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rings: dict[frozenset[str], HashRing] = {}

    def key(self, request: RequestInfo) -> str | None:
        """The affinity key of a request, or None to fall back to least pending tokens."""
        raise NotImplementedError

    def ring(self, names: frozenset[str]) -> HashRing:
        """The ring over ``names`` (a few recent rings are cached: the eligible set rarely changes)."""
        ring = self._rings.get(names)
        if ring is None:
            if len(self._rings) >= 16:
                self._rings.clear()
            ring = self._rings[names] = HashRing(sorted(names), self.config.virtual_nodes)
        return ring

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        stale = self.config.stale_after_s
        loads = {r.name: r.pending_tokens(stale, now) for r in candidates}
        key = self.key(request)
        if key is None or len(candidates) == 1:
            return self.pick_min(candidates, lambda r: loads[r.name])
        by_name = {r.name: r for r in candidates}
        bound = (1 + self.config.balance_epsilon) * (sum(loads.values()) + request.tokens) / len(candidates)
        bound += self.config.balance_slack_tokens
        for name in self.ring(frozenset(by_name)).walk(stable_hash(key)):
            if loads[name] <= bound:
                return by_name[name]
        return self.pick_min(candidates, lambda r: loads[r.name])  # unreachable: the least loaded fits
