"""Expert parallelism (EP) inside one replica: which rank owns which expert, and how tokens reach their experts.

vLLM's flags: ``--enable-expert-parallel`` shards the routed experts of every MoE layer over the replica's ranks
(EP size = TP x DP; one engine is one replica, so DP = 1 and EP = TP), ``--expert-placement-strategy`` picks the
owner of each expert and ``--all2all-backend`` how tokens reach it. Attention stays tensor-parallel, so after it
every rank holds the same hidden states of all the step's tokens:

- ``allgather_reducescatter``: the all-gather is already done (the tokens are replicated), each rank runs its own
  experts over the tokens routed to them, and one all-reduce sums the partial outputs (a reduce-scatter followed
  by the all-gather that the replicated layout needs, fused).
- ``alltoall``: each rank takes its 1/EP slice of the tokens, exchanges per-rank pair counts, dispatches every
  (token, expert) pair to the expert's owner, which runs it and sends it back (combine, ``all_to_all_single``
  both ways); the owner of the token weights and sums its pairs, and an all-gather of the slices restores the
  replicated layout.

Collectives go through engine/device.py (gloo, NCCL, HCCL). Without EP, every rank holds every expert with its
intermediate size split tensor-parallel (like the dense MLP), and the partial outputs are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pypto_serving.engine import device
from pypto_serving.engine.config import PLACEMENTS
from pypto_serving.engine.layers.linear import tp_group


@dataclass(frozen=True)
class ExpertParallelConfig:
    """The EP settings of this process's replica (set by the model runner before it builds the model)."""

    enabled: bool = False
    placement: str = "linear"
    backend: str = "allgather_reducescatter"


_config = ExpertParallelConfig()


def configure(config: ExpertParallelConfig) -> None:
    """Set the EP settings that MoE layers built from now on use."""
    global _config
    _config = config


def current() -> ExpertParallelConfig:
    """The EP settings of this process."""
    return _config


def expert_owners(num_experts: int, ep_size: int, placement: str) -> list[int]:
    """The EP rank owning each expert: ``linear`` gives rank r a contiguous block (the first ``E % EP`` ranks one
    more), ``round_robin`` gives expert e to rank ``e % EP``."""
    if num_experts < ep_size:
        raise ValueError(f"expert parallel: {num_experts} experts cannot be sharded over {ep_size} ranks "
                         "(need at least one expert per rank)")
    if placement == "round_robin":
        return [e % ep_size for e in range(num_experts)]
    if placement != "linear":
        raise ValueError(f"expert_placement_strategy: must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    base, extra = divmod(num_experts, ep_size)
    return [r for r in range(ep_size) for _ in range(base + (r < extra))]


def token_slices(num_tokens: int, ep_size: int) -> list[int]:
    """How many of the step's tokens each rank dispatches under ``alltoall`` (the first ``T % EP`` one more)."""
    base, extra = divmod(num_tokens, ep_size)
    return [base + (r < extra) for r in range(ep_size)]


def alltoall_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, owner: torch.Tensor,
                     slot: torch.Tensor, run_experts, rank: int, ep_size: int) -> torch.Tensor:
    """The routed-expert output of all tokens ``x`` [T, H] (replicated) with the ``alltoall`` backend.

    ``owner`` / ``slot`` map a global expert id to its rank and its index there; ``run_experts(rows,
    local_ids)`` runs this rank's experts on received rows. Returns [T, H], the same on every rank.
    """
    sizes = token_slices(x.shape[0], ep_size)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    ids, k = topk_ids[mine].flatten(), topk_ids.shape[1]
    dest = owner[ids]
    order = torch.argsort(dest * owner.numel() + slot[ids], stable=True)  # by rank, then by expert
    token = order // k
    send_counts = torch.bincount(dest, minlength=ep_size)
    recv_counts = device.all_to_all(send_counts, [1] * ep_size, [1] * ep_size, tp_group())  # counts first
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = device.all_to_all(x[mine][token], send, recv, tp_group())  # dispatch
    recv_e = device.all_to_all(slot[ids[order]], send, recv, tp_group())
    back = device.all_to_all(run_experts(recv_x, recv_e), recv, send, tp_group())  # combine
    weighted = back * topk_weights[mine].flatten()[order, None]
    out = torch.zeros((max(sizes), x.shape[1]), dtype=x.dtype, device=x.device)
    out.index_add_(0, token, weighted)
    # equal shapes: slices padded to the largest
    gathered = device.all_gather(out, tp_group()).view(ep_size, max(sizes), -1)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
