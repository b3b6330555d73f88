"""Routing policies, one module each behind ``base.Policy``; ``make_policy`` builds one by name."""

from __future__ import annotations

import random

from pypto_serving.gateway.policies.base import Policy, PolicyConfig
from pypto_serving.gateway.policies.least_pending_tokens import LeastPendingTokens
from pypto_serving.gateway.policies.least_requests import LeastRequests
from pypto_serving.gateway.policies.prefix_aware import PrefixAware
from pypto_serving.gateway.policies.round_robin import RoundRobin
from pypto_serving.gateway.policies.session import Session

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (LeastPendingTokens, LeastRequests, RoundRobin, PrefixAware, Session)
}
DEFAULT_POLICY = LeastPendingTokens.name


def make_policy(name: str, config: PolicyConfig | None = None, rng: random.Random | None = None) -> Policy:
    """Instantiate the policy called ``name`` (KeyError lists the known names)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}") from None
    return cls(config, rng)


__all__ = ["DEFAULT_POLICY", "POLICIES", "Policy", "PolicyConfig", "make_policy"]
