"""`prefix-aware`: requests sharing their leading prompt blocks go to the replica that holds them in cache.

The key is the prompt's first ``prefix_blocks`` blocks of ``prefix_block_chars`` characters (whole blocks only,
or the whole prompt when it is shorter than one block): two prompts sharing that much map to the same point on
the ring, and consistent hashing with bounded loads keeps every replica within (1 + epsilon) x mean load.
"""

from __future__ import annotations

from pypto_serving.gateway.policies.hashring import BoundedHashPolicy
from pypto_serving.gateway.request import RequestInfo


def prefix_key(text: str, block_chars: int, blocks: int) -> str | None:
    """The leading whole blocks of ``text`` (at most ``blocks`` of them), or None for an empty prompt."""
    if not text:
        return None
    if len(text) < block_chars:
        return text
    length = min(len(text) // block_chars, blocks) * block_chars
    return text[:length]


class PrefixAware(BoundedHashPolicy):
    """Consistent hashing with bounded loads over the prompt's leading blocks."""

    name = "prefix-aware"

    def key(self, request: RequestInfo) -> str | None:
        return prefix_key(request.prefix_text, self.config.prefix_block_chars, self.config.prefix_blocks)
