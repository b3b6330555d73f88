"""The attention-backend seam: what every backend implements, and the metadata shared by all layers of a step.

A step's tokens arrive flattened, decodes first (one new token each, sorted by context length), then prefill
chunks. The model runner describes them once per step (`StepAttention`); the backend turns that into its own
`AttentionMetadata` (block tables, masks, workspaces) in `prepare`, and every layer's `Attention` module calls
`write_kv` (this step's K/V into their slots of the paged pool) then `attend`. Backends: torch_ref.py (plain torch,
any device), cpu.py (a C kernel that reads K/V blocks in place), npu.py (where torch_npu's fused ops plug in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from pypto_serving.engine.layers.attention import Attention


@dataclass
class StepAttention:
    """One step's sequences as the runner orders them (decodes first, by context length; then prefills)."""

    slot_mapping: torch.Tensor  # [T] pool slot of every new token, on the device
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache after this step (cached + new)
    block_tables: list[list[int]]

    @property
    def num_decodes(self) -> int:
        """Sequences at the front with a single new token (their attention needs no causal mask)."""
        n = 0
        while n < len(self.query_lens) and self.query_lens[n] == 1:
            n += 1
        return n


@dataclass
class AttentionMetadata:
    """What every layer needs for one step; a backend subclasses it with its own fields."""

    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] pool slot of every new token


class AttentionBackend:
    """Paged attention over a KV pool ``[num_blocks, block_size, kv_heads, head_dim]`` per layer (K and V).

    Token ``t`` of a sequence lives in block ``block_table[t // block_size]``, row ``t % block_size``.
    """

    name: ClassVar[str]

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
                 block_bytes_per_layer: int) -> None:
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.num_blocks, self.block_bytes_per_layer = num_blocks, block_bytes_per_layer

    def prepare(self, step: StepAttention) -> AttentionMetadata:
        """This step's metadata, built once and shared by every layer."""
        raise NotImplementedError

    def write_kv(self, layer: Attention, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Write this step's k/v [T, kv_heads, dim] into their slots of the layer's pool."""
        flat = (-1, layer.num_kv_heads, layer.head_dim)
        layer.k_cache.view(flat).index_copy_(0, meta.slot_mapping, k)
        layer.v_cache.view(flat).index_copy_(0, meta.slot_mapping, v)

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        """Attention output [T, heads, dim] of q [T, heads, dim] (k/v: this step's own, already in the pool)."""
        raise NotImplementedError
