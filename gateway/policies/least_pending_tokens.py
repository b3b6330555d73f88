"""`least-pending-tokens` (default): the replica where the request would get its first token soonest.

Measured on heavy-tailed traffic (benchmarks/gateway_routing.py), what decides a request's time to first token is
whether it starts at once or waits for a batch slot, and how long that wait is. Pending tokens alone mislead both
ways: a replica running one long request next to a free slot has many pending tokens but starts a new request at
once, and one whose slots hold two medium requests has fewer than one holding a long and an almost finished one,
though the latter frees a slot far sooner. So the score, compared as a tuple, is:

1. **Starts at once** (tier 0): a free batch slot (``max_num_seqs`` above running + waiting + this gateway's
   requests not admitted yet, minus its requests that ended since the reading) and KV room. Among those, the
   smallest batch (a step is faster, and no prefill of someone else's shares it), then the fewest pending tokens.
2. **Waits** (tier 1): the tokens the request would wait for: the engine reports how many tokens each running
   request has left at most (``running_remaining``, smallest first), so with k requests queued ahead of it the
   request starts when the (k+1)-th of them finishes. Beyond the reported ones, a fluid estimate (pending tokens
   per slot). KV pressure (over 95% of the blocks in use) makes a free slot count as busy: the request would wait
   for blocks. An engine that does not report its slots is scored by pending tokens per slot here too.
3. **Unknown** replicas (no reading, or one older than ``stale_after_s``: the load stream went silent) rank as
   waiting for the tokens this gateway itself sent them, so they are tried after every replica known to be free.
"""

from __future__ import annotations

from collections.abc import Sequence

from pypto_serving.gateway.policies.base import Policy
from pypto_serving.gateway.replicas import KV_FULL, Replica
from pypto_serving.gateway.request import RequestInfo


def start_cost(replica: Replica, stale_after: float, now: float) -> tuple[int, int, int]:
    """(tier, tokens to wait for or batch size, pending tokens): the lower, the sooner a new request starts."""
    reading = replica.fresh_reading(stale_after, now)
    if reading is None:
        return 1, replica.inflight_tokens + 1, replica.inflight_tokens
    pending = reading.pending_tokens + replica.unabsorbed_tokens
    balance = replica.slot_balance(reading)
    slots = reading.max_num_seqs
    if balance is None or slots is None:  # an engine that does not say: pending tokens per request in it
        return 1, pending // max(1, reading.running + reading.waiting + replica.unabsorbed), pending
    if balance > 0 and reading.kv_cache_usage <= KV_FULL:
        return 0, slots - balance, pending  # the batch it would join
    remaining = reading.running_remaining[min(replica.released, reading.running):]  # the ended: nearest to done
    position = max(0, -balance)  # running requests that must finish before this one starts, minus one
    if position < len(remaining):
        return 1, remaining[position], pending
    return 1, (remaining[-1] if remaining else 0) + pending // slots, pending


class LeastPendingTokens(Policy):
    """The replica where the request starts soonest: a free slot first (smallest batch), else the shortest wait
    for one (from the running requests' remaining tokens), unknown replicas last; ties at random."""

    name = "least-pending-tokens"

    def select(self, candidates: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        stale = self.config.stale_after_s
        return self.pick_min(candidates, lambda r: start_cost(r, stale, now))
