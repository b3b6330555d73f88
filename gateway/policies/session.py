"""`session`: requests of one session (``x-session-id`` header or the OpenAI ``user`` field) stick to one replica.

Same bounded-load ring as prefix-aware; requests without a session go to the least pending tokens.
"""

from __future__ import annotations

from pypto_serving.gateway.policies.hashring import BoundedHashPolicy
from pypto_serving.gateway.request import RequestInfo


class Session(BoundedHashPolicy):
    """Session affinity with bounded loads."""

    name = "session"

    def key(self, request: RequestInfo) -> str | None:
        return f"session:{request.session}" if request.session else None
