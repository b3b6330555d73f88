"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the (padded) vocabulary."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pypto_serving.engine.layers.linear import Kernel, matmul, tp_group, tp_rank_size


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks; lookups outside a rank's slice are zero."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)  # ceil: the last shard is zero-padded
        self.start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's vocabulary rows."""
        rows = max(0, min(self.shard_size, self.vocab_size - self.start))
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        mask = (token_ids >= self.start) & (token_ids < self.start + self.shard_size)
        y = F.embedding((token_ids - self.start) * mask, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y, group=tp_group())
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary: each rank's slice, all-gathered (supported by gloo, NCCL and HCCL alike)."""

    kernel: Kernel | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = matmul(self, hidden, None)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits, group=tp_group())
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
