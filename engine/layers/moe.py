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
from pypto_serving.engine.layers.linear import _param


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
        self.ep = ep.current()
        self.lay = ep.layout()
        owners = ep.expert_owners(num_experts, self.lay.ep_size, self.ep.placement)
        slots, seen = [], [0] * self.lay.ep_size  # each expert's index on its owner
        for r in owners:
            slots.append(seen[r])
            seen[r] += 1
        self.gate = Router(hidden, num_experts, cfg.num_experts_per_tok, bool(getattr(cfg, "norm_topk_prob", False)))
        shard = (0, 1) if self.ep.enabled else (self.lay.tp_rank, self.lay.tp_size)
        mine = [e for e, r in enumerate(owners) if r == self.lay.ep_rank]
        self.experts = LocalExperts(mine, hidden, cfg.moe_intermediate_size, shard)
        self.register_buffer("owner", torch.tensor(owners), persistent=False)
        self.register_buffer("slot", torch.tensor(slots), persistent=False)
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, H] of this DP rank's tokens ``x`` [T, H] (the same on its TP ranks)."""
        lay = self.lay
        if lay.dp_size > 1 and self.ep.backend != "alltoall":  # DP+EP: every EP rank sees every DP rank's tokens
            everyone, rows, own = ep.gather_dp_tokens(x, lay)
            tokens = everyone[rows]
            _, weights, ids = self.gate(tokens)
            self._count(ids[own])
            partial = torch.zeros_like(everyone).index_add_(0, rows, self._run_local(tokens, ids, weights))
            return ep.return_dp_tokens(partial, x.shape[0], lay)
        _, weights, ids = self.gate(x)
        self._count(ids)
        if lay.ep_size > 1 and self.ep.backend == "alltoall":
            return ep.alltoall_experts(x, ids, weights, self.owner, self.slot, self.experts, lay)
        out = self._run_local(x, ids, weights)
        return device.all_reduce(out, lay.tp_group) if lay.tp_size > 1 else out

    def _run_local(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output [T, H]: its experts' weighted outputs for the (token, k) pairs they own."""
        flat = ids.flatten()
        pairs = torch.nonzero(self.owner[flat] == self.lay.ep_rank).squeeze(1)
        token = pairs // ids.shape[1]
        y = self.experts(x[token], self.slot[flat[pairs]]) * weights.flatten()[pairs, None]
        return torch.zeros_like(x).index_add_(0, token, y)

    def _count(self, ids: torch.Tensor) -> None:
        self.expert_tokens += torch.bincount(ids.flatten(), minlength=self.num_experts)

    def take_expert_tokens(self) -> torch.Tensor:
        """Tokens of this DP rank routed to each expert since the last call (the same count on its TP ranks)."""
        counts = self.expert_tokens.clone()
        self.expert_tokens.zero_()
        return counts
