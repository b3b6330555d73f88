"""Paged attention in plain torch: K/V live in a block pool and are read and written through block tables.

KV pool layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (one for K, one for V); token
``t`` of a sequence lives in block ``block_table[t // block_size]``, row ``t % block_size`` (its "slot").
Each step first writes the new tokens' K/V into their slots. Then:

- decodes (one new token per sequence) are sorted by context length and cut into groups whose padding stays
  small; each group gathers its blocks into a reusable workspace (one `index_select`, no allocation) and runs one
  batched SDPA with a padding mask;
- prefill chunks run one SDPA each: causal over the new tokens alone when there is no earlier context, else over
  the gathered context with a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_GQA_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class DecodeGroup:
    """Decode sequences ``start:end`` (one token each), their padded block tables and key padding mask."""

    start: int
    end: int
    blocks: torch.Tensor  # [n * blocks_per_seq] block ids, padded with block 0
    blocks_per_seq: int
    mask: torch.Tensor  # [n, 1, 1, blocks_per_seq * block_size] True where a key is visible


@dataclass
class PrefillChunk:
    """New tokens ``start:end`` of one sequence; ``blocks``/``mask`` are set when earlier tokens are cached."""

    start: int
    end: int
    blocks: torch.Tensor | None = None  # [blocks covering the whole context]
    mask: torch.Tensor | None = None  # [n, context_len] causal mask offset by the cached tokens


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the pool and how each sequence attends (shared by all layers)."""

    slot_mapping: torch.Tensor  # [T] slot of each new token
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    k_work: torch.Tensor | None = None  # gather workspace [>= blocks gathered at once, block_size, kv_heads, dim]
    v_work: torch.Tensor | None = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, L, D] tensors with grouped-query k/v."""
    if _GQA_SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class Attention(nn.Module):
    """Attention of one layer over its slice of the paged KV pool (``k_cache``/``v_cache`` set by the runner)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def _gather(self, blocks: torch.Tensor, meta: AttentionMetadata, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of ``n`` sequences' blocks as [n, kv_heads, L, dim] views of the workspace."""
        count = blocks.numel()
        k = torch.index_select(self.k_cache, 0, blocks, out=meta.k_work[:count])
        v = torch.index_select(self.v_cache, 0, blocks, out=meta.v_work[:count])
        shape = (n, -1, self.num_kv_heads, self.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _decode_matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode attention as two batched matmuls (CPU half precision, where SDPA's kernel is slow)."""
        n, group = q.shape[0], self.num_heads // self.num_kv_heads
        qq = q.view(n, self.num_kv_heads, group, self.head_dim) * self.scale
        scores = torch.matmul(qq, k.transpose(2, 3)).float()  # [n, kv_heads, group, L]
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).view(n, self.num_heads, self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] for this step's tokens -> [T, Hq * D]."""
        flat = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache.view(flat).index_copy_(0, meta.slot_mapping, k)
        self.v_cache.view(flat).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for g in meta.decodes:
            kk, vv = self._gather(g.blocks, meta, g.end - g.start)
            if self.k_cache.device.type == "cpu" and q.dtype != torch.float32:
                out[g.start:g.end] = self._decode_matmul(q[g.start:g.end], kk, vv, g.mask)
            else:
                out[g.start:g.end] = sdpa(q[g.start:g.end].unsqueeze(2), kk, vv, g.mask, self.scale).squeeze(2)
        for p in meta.prefills:
            qq = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
            if p.blocks is None:
                kk, vv = (t[p.start:p.end].transpose(0, 1).unsqueeze(0) for t in (k, v))
                o = sdpa(qq, kk, vv, None, self.scale, causal=True)
            else:
                kk, vv = self._gather(p.blocks, meta, 1)
                ctx = p.mask.shape[1]
                o = sdpa(qq, kk[:, :, :ctx], vv[:, :, :ctx], p.mask, self.scale)
            out[p.start:p.end] = o[0].transpose(0, 1)
        return out.view(q.shape[0], -1)
