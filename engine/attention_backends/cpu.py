"""The CPU backend: decodes attend over K/V read in place from the block pool by a C kernel (kernel.py), with no
gather copy and no padding; prefill chunks are the reference backend's (causal SDPA on their own tokens, or one
gather of the cached context per chunk, shared by all of its tokens).

Chosen by measurement against the reference path's gather + SDPA (docs/benchmarks.md, "Engine core speed"). The
kernel covers float32 and bfloat16; float16 (and a machine without a C compiler) falls back to the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pypto_serving.engine.attention_backends import kernel
from pypto_serving.engine.attention_backends.base import StepAttention
from pypto_serving.engine.attention_backends.torch_ref import TorchRefBackend, TorchRefMetadata


@dataclass
class CpuMetadata(TorchRefMetadata):
    num_decodes: int = 0
    tables: torch.Tensor | None = None  # [decodes, max blocks] block tables of the decodes (padded with 0)
    row_seq: torch.Tensor | None = None  # [decodes] row -> its table (the identity: one token per decode)
    row_len: torch.Tensor | None = None  # [decodes] context length of each decode


class CpuBackend(TorchRefBackend):
    """Decodes through the paged-attention kernel, prefills as the reference backend."""

    name = "cpu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        built = kernel.load()
        self.kernel = built if built is not None and built.supports(self.dtype) else None
        if self.kernel is None:
            self.name = "torch_ref"  # the reference path, in full

    def prepare(self, step: StepAttention) -> CpuMetadata:
        meta = CpuMetadata(self, step.slot_mapping)
        if self.kernel is None:
            self._decode_groups(step, meta)
            self._prefill_chunks(step, meta)
            return meta
        n, bs = step.num_decodes, self.block_size
        if n:
            ctxs = step.context_lens[:n]
            width = -(-max(ctxs) // bs)
            rows = []
            for ctx, table in zip(ctxs, step.block_tables[:n], strict=True):
                used = table[: -(-ctx // bs)]
                if len(used) * bs < ctx or ctx < 1:
                    raise ValueError(f"attention: a context of {ctx} tokens needs more than {len(used)} blocks")
                rows.append(used + [0] * (width - len(used)))
            tables = torch.tensor(rows, dtype=torch.long)
            if int(tables.min()) < 0 or int(tables.max()) >= self.num_blocks:
                raise ValueError(f"attention: a block id is outside the pool of {self.num_blocks} blocks")
            meta.num_decodes, meta.tables = n, tables
            meta.row_seq, meta.row_len = torch.arange(n), torch.tensor(ctxs, dtype=torch.long)
        self._prefill_chunks(step, meta)
        return meta

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: CpuMetadata) -> torch.Tensor:
        if self.kernel is None:
            return super().attend(layer, q, k, v, meta)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            qd = q[:n].contiguous()
            self.kernel(qd, layer.k_cache, layer.v_cache, meta.tables, meta.row_seq, meta.row_len, out[:n],
                        layer.scale)
        self._attend_prefills(layer, q, k, v, meta, out)
        return out
