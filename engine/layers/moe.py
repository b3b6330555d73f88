"""Routed experts of one MoE layer: top-k router, tokens grouped by expert, one matmul pair per local expert.

`FusedMoE` holds the checkpoint names of Qwen2/Qwen3-MoE (``mlp.gate.weight`` and the experts' gate/up/down
projections, stacked here as ``experts.w13_weight`` [E_local, 2I, H] and ``experts.w2_weight`` [E_local, H, I]).
Without expert parallelism each rank holds every expert with I split tensor-parallel; with it, each rank holds
whole experts (engine/expert_parallel.py picks them and moves the tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pypto_serving.engine import device
from pypto_serving.engine import expert_parallel as ep
from pypto_serving.engine.layers.linear import _param, tp_group, tp_rank_size


class Router(nn.Module):
    """Top-k routing as transformers does it: softmax in float32, top-k, optional renormalisation."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = _param(num_experts, hidden_size)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E], top-k weights [T, k] in x's dtype, top-k expert ids [T, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids


class LocalExperts(nn.Module):
    """This rank's experts as stacked SwiGLU weights; rows are grouped by expert and run one matmul pair each."""

    def __init__(self, experts: list[int], hidden_size: int, intermediate_size: int, shard: tuple[int, int]) -> None:
        super().__init__()
        self.shard_rank, shard_size = shard  # tensor-parallel split of the intermediate size (no EP), else (0, 1)
        if intermediate_size % shard_size:
            raise ValueError(f"moe_intermediate_size {intermediate_size} is not divisible by tensor_parallel_size "
                             f"{shard_size}")
        self.inter = intermediate_size // shard_size
        self.local = {e: i for i, e in enumerate(experts)}  # global expert id -> index here
        self.w13_weight = _param(len(experts), 2 * self.inter, hidden_size)
        self.w2_weight = _param(len(experts), hidden_size, self.inter)
        self.w13_weight.weight_loader = self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        """Copy expert ``shard[0]``'s ``shard[1]`` (gate_proj|up_proj|down_proj) if this rank holds it."""
        expert, proj = shard
        index = self.local.get(expert)
        if index is None:
            return  # another EP rank's expert
        n, start = self.inter, self.shard_rank * self.inter
        if proj == "down_proj":
            param.data[index].copy_(loaded.narrow(1, start, n))
        else:
            param.data[index].narrow(0, 0 if proj == "gate_proj" else n, n).copy_(loaded.narrow(0, start, n))

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Row i of ``x`` through local expert ``expert[i]``: sort rows by expert, one gate_up + down per expert."""
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.w13_weight.shape[0]).tolist()
        parts = []
        for e, rows in enumerate(x[order].split(counts)):
            if rows.shape[0]:
                gate, up = F.linear(rows, self.w13_weight[e]).chunk(2, dim=-1)
                parts.append(F.linear(F.silu(gate) * up, self.w2_weight[e]))
        out = torch.empty_like(x)
        if parts:
            out[order] = torch.cat(parts)
        return out


class FusedMoE(nn.Module):
    """Router + routed experts of one layer; counts the tokens each expert receives (``take_expert_tokens``)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        num_experts, hidden = cfg.num_experts, cfg.hidden_size
        self.num_experts = num_experts
        self.rank, self.world = tp_rank_size()
        self.ep = ep.current()
        self.ep_size = self.world if self.ep.enabled else 1
        owners = ep.expert_owners(num_experts, self.ep_size, self.ep.placement)
        self.ep_rank = self.rank if self.ep.enabled else 0
        slots, seen = [], [0] * self.ep_size  # each expert's index on its owner
        for r in owners:
            slots.append(seen[r])
            seen[r] += 1
        self.gate = Router(hidden, num_experts, cfg.num_experts_per_tok, bool(getattr(cfg, "norm_topk_prob", False)))
        shard = (0, 1) if self.ep.enabled else (self.rank, self.world)
        mine = [e for e, r in enumerate(owners) if r == self.ep_rank]
        self.experts = LocalExperts(mine, hidden, cfg.moe_intermediate_size, shard)
        self.register_buffer("owner", torch.tensor(owners), persistent=False)
        self.register_buffer("slot", torch.tensor(slots), persistent=False)
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, H] of the replicated tokens ``x`` [T, H] (the same on every rank)."""
        _, weights, ids = self.gate(x)
        self.expert_tokens += torch.bincount(ids.flatten(), minlength=self.num_experts)
        if self.ep_size > 1 and self.ep.backend == "alltoall":
            return ep.alltoall_experts(x, ids, weights, self.owner, self.slot, self.experts, self.rank, self.ep_size)
        flat = ids.flatten()
        pairs = torch.nonzero(self.owner[flat] == self.ep_rank).squeeze(1)  # (token, k) pairs whose expert is here
        token = pairs // ids.shape[1]
        y = self.experts(x[token], self.slot[flat[pairs]]) * weights.flatten()[pairs, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        return device.all_reduce(out, tp_group()) if self.world > 1 else out

    def take_expert_tokens(self) -> torch.Tensor:
        """Tokens routed to each expert since the last call (counts every token once, on every rank)."""
        counts = self.expert_tokens.clone()
        self.expert_tokens.zero_()
        return counts
