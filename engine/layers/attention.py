"""Paged attention of one layer: K/V live in a block pool, read and written by the step's attention backend.

KV pool layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (one for K, one for V); token
``t`` of a sequence lives in block ``block_table[t // block_size]``, row ``t % block_size`` (its "slot").
How the pool is read (gather + SDPA, an in-place kernel, fused NPU ops) is the backend's business
(engine/attention_backends/); the step's metadata carries the backend, so the layers stay device-agnostic.
"""

from __future__ import annotations

import torch
from torch import nn

from pypto_serving.engine.attention_backends.base import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]


class Attention(nn.Module):
    """Attention of one layer over its slice of the paged KV pool (``k_cache``/``v_cache`` set by the runner)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] for this step's tokens -> [T, Hq * D]."""
        meta.backend.write_kv(self, k, v, meta)
        return meta.backend.attend(self, q, k, v, meta).view(q.shape[0], -1)
