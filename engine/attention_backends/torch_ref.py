"""The plain-torch reference backend (any device; cuda and npu use it until their own backends exist).

- Decodes (one new token per sequence, sorted by context length) are cut into groups whose padding stays small;
  each group gathers its blocks into a reusable workspace (one `index_select`, no allocation) and runs one
  batched SDPA with a padding mask (on cpu in half precision: two matmuls, faster than SDPA's kernel there).
- Prefill chunks run one SDPA each: causal over the new tokens alone when nothing earlier is cached, else over the
  gathered context with a causal mask offset by the cached tokens (one gather per chunk, shared by its tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pypto_serving.engine.attention_backends.base import AttentionBackend, AttentionMetadata, StepAttention

_GQA_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)

# Decode groups: a group is split when padding it to a longer member would gather more than GROUP_PAD_BYTES of
# unused K/V per layer (about the cost of one more gather + SDPA call), and kept under GROUP_MAX_BYTES of gathered
# K/V per layer on cpu so the workspace stays in the CPU's cache between the gather and the attention that reads it.
GROUP_PAD_BYTES = 256 << 10
GROUP_MAX_BYTES = 4 << 20


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
class TorchRefMetadata(AttentionMetadata):
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, L, D] tensors with grouped-query k/v."""
    if _GQA_SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class TorchRefBackend(AttentionBackend):
    """Gather + SDPA (see the module docstring)."""

    name = "torch_ref"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k_work = self.v_work = torch.empty(0)

    def _workspace(self, blocks: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather buffers of at least ``blocks`` blocks, grown geometrically and reused across steps."""
        if self.k_work.shape[0] < blocks:
            size = max(blocks, int(self.k_work.shape[0] * 1.5))
            shape = (size, *like.shape[1:])
            self.k_work = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.v_work = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self.k_work, self.v_work

    def prepare(self, step: StepAttention) -> TorchRefMetadata:
        meta = TorchRefMetadata(self, step.slot_mapping)
        self._prefill_chunks(step, meta)
        self._decode_groups(step, meta)
        return meta

    def _prefill_chunks(self, step: StepAttention, meta: TorchRefMetadata) -> None:
        """Chunks of the prefills (the sequences after the decodes)."""
        bs, first = self.block_size, step.num_decodes
        offset = sum(step.query_lens[:first])
        for n, ctx, table in zip(step.query_lens[first:], step.context_lens[first:], step.block_tables[first:],
                                 strict=True):
            chunk = PrefillChunk(offset, offset + n)
            if ctx > n:  # earlier tokens are cached: attend over the gathered context
                chunk.blocks = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long).to(self.device)
                q_pos = torch.arange(ctx - n, ctx)[:, None]
                chunk.mask = (torch.arange(ctx)[None, :] <= q_pos).to(self.device)
            meta.prefills.append(chunk)
            offset += n

    def _decode_groups(self, step: StepAttention, meta: TorchRefMetadata) -> None:
        """Cut the length-sorted decodes into padded groups."""
        bs, start, ctxs, tables = self.block_size, 0, step.context_lens, step.block_tables
        pad_blocks = max(1, GROUP_PAD_BYTES // self.block_bytes_per_layer)
        max_blocks = max(1, GROUP_MAX_BYTES // self.block_bytes_per_layer) if self.device.type == "cpu" else 1 << 62
        decodes = step.num_decodes
        while start < decodes:
            end, useful = start + 1, -(-ctxs[start] // bs)
            while end < decodes:
                nb, size = -(-ctxs[end] // bs), end - start + 1
                # extending pads every member to nb blocks (decodes are sorted by length)
                if nb * size - useful - nb > pad_blocks or nb * size > max_blocks:
                    break
                useful += nb
                end += 1
            width = -(-ctxs[end - 1] // bs)
            blocks = torch.tensor([tables[i][:width] + [0] * (width - len(tables[i][:width]))
                                   for i in range(start, end)], dtype=torch.long)
            lens = torch.tensor(ctxs[start:end])
            mask = (torch.arange(width * bs)[None, :] < lens[:, None]).view(end - start, 1, 1, -1)
            meta.decodes.append(DecodeGroup(start, end, blocks.view(-1).to(self.device), width, mask.to(self.device)))
            start = end

    def _gather(self, layer, blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of ``n`` sequences' blocks as [n, kv_heads, L, dim] views of the workspace."""
        count = blocks.numel()
        k_work, v_work = self._workspace(count, layer.k_cache)
        k = torch.index_select(layer.k_cache, 0, blocks, out=k_work[:count])
        v = torch.index_select(layer.v_cache, 0, blocks, out=v_work[:count])
        shape = (n, -1, layer.num_kv_heads, layer.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    @staticmethod
    def _decode_matmul(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode attention as two batched matmuls (CPU half precision, where SDPA's kernel is slow)."""
        n, group = q.shape[0], layer.num_heads // layer.num_kv_heads
        qq = q.view(n, layer.num_kv_heads, group, layer.head_dim) * layer.scale
        scores = torch.matmul(qq, k.transpose(2, 3)).float()  # [n, kv_heads, group, L]
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).view(n, layer.num_heads, layer.head_dim)

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: TorchRefMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for g in meta.decodes:
            kk, vv = self._gather(layer, g.blocks, g.end - g.start)
            if q.device.type == "cpu" and q.dtype != torch.float32:
                out[g.start:g.end] = self._decode_matmul(layer, q[g.start:g.end], kk, vv, g.mask)
            else:
                out[g.start:g.end] = sdpa(q[g.start:g.end].unsqueeze(2), kk, vv, g.mask, layer.scale).squeeze(2)
        self._attend_prefills(layer, q, k, v, meta, out)
        return out

    def _attend_prefills(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchRefMetadata,
                         out: torch.Tensor) -> None:
        for p in meta.prefills:
            qq = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
            if p.blocks is None:
                kk, vv = (t[p.start:p.end].transpose(0, 1).unsqueeze(0) for t in (k, v))
                o = sdpa(qq, kk, vv, None, layer.scale, causal=True)
            else:
                kk, vv = self._gather(layer, p.blocks, 1)
                ctx = p.mask.shape[1]
                o = sdpa(qq, kk[:, :, :ctx], vv[:, :, :ctx], p.mask, layer.scale)
            out[p.start:p.end] = o[0].transpose(0, 1)
