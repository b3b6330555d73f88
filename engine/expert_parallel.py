"""Expert parallelism (EP) inside one replica: which rank owns which expert, and how tokens reach their experts.

vLLM's flags: ``--enable-expert-parallel`` shards the routed experts of every MoE layer over the EP ranks, EP size
= TP x DP: the TP ranks of this engine, and under DP+EP (data_parallel.py) the TP ranks of every DP rank's engine.
``--expert-placement-strategy`` picks the owner of each expert and ``--all2all-backend`` how tokens reach it.
Attention stays tensor-parallel, so after it the TP ranks of one DP rank hold the same hidden states of that DP
rank's tokens; different DP ranks hold different tokens. Each EP rank is "responsible" for a 1/TP slice of its DP
rank's tokens (`token_slices`):

- ``allgather_reducescatter``: with one DP rank the all-gather is already done (the tokens are replicated), each
  rank runs its own experts over the tokens routed to them, and one all-reduce sums the partial outputs (a
  reduce-scatter followed by the all-gather that the replicated layout needs, fused). Under DP+EP every EP rank
  all-gathers the slices of all ranks (padded to the largest slice, from the step metadata: gathers need equal
  shapes), runs its experts over all of them, the partial outputs are all-reduced (a reduce-scatter whose own slice
  each rank keeps: gloo has no reduce_scatter_tensor), and the TP ranks all-gather their slices back.
- ``alltoall``: each rank takes its slice, exchanges per-rank pair counts with every EP rank, dispatches every
  (token, expert) pair to the expert's owner, which runs it and sends it back (combine, ``all_to_all_single``
  both ways, uneven splits: no padding); the owner of the token weights and sums its pairs, and an all-gather over
  the TP ranks restores the replicated layout.

Collectives go through engine/device.py (gloo, NCCL, HCCL). Without EP, every rank holds every expert with its
intermediate size split tensor-parallel (like the dense MLP), and the partial outputs are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pypto_serving.engine import device
from pypto_serving.engine.config import PLACEMENTS
from pypto_serving.engine.layers.linear import tp_group, tp_rank_size


@dataclass(frozen=True)
class ExpertParallelConfig:
    """The EP settings of this process's replica (set by the model runner before it builds the model)."""

    enabled: bool = False
    placement: str = "linear"
    backend: str = "allgather_reducescatter"
    dp_size: int = 1  # DP ranks sharing the experts (their engines step in lockstep)
    dp_rank: int = 0


@dataclass(frozen=True)
class EPLayout:
    """Where this rank sits: TP rank of its DP rank's tensor-parallel group, EP rank of the expert-parallel group
    (EP rank = DP rank x TP + TP rank; the EP group is the TP group when DP = 1)."""

    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup | None
    ep_rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int


_config = ExpertParallelConfig()
_dp_tokens: list[int] = []  # this step's token count of every DP rank (set by the model runner under DP+EP)
_dp_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's gathered-row index, built by its first layer


def configure(config: ExpertParallelConfig) -> None:
    """Set the EP settings that MoE layers built from now on use."""
    global _config
    _config = config


def current() -> ExpertParallelConfig:
    """The EP settings of this process."""
    return _config


def layout() -> EPLayout:
    """This rank's TP and EP coordinates (without EP: EP size 1)."""
    tp_rank, tp_size = tp_rank_size()
    if not _config.enabled:
        return EPLayout(tp_rank, tp_size, tp_group(), 0, 1, tp_group(), 0, 1)
    if _config.dp_size == 1:
        return EPLayout(tp_rank, tp_size, tp_group(), tp_rank, tp_size, tp_group(), 0, 1)
    # DP+EP: the world is DP x TP ranks (data_parallel.init_world), the default group
    return EPLayout(tp_rank, tp_size, tp_group(), dist.get_rank(), dist.get_world_size(), None, _config.dp_rank,
                    _config.dp_size)


def set_dp_tokens(tokens: list[int]) -> None:
    """This step's token count of every DP rank (from the step's metadata all-reduce)."""
    global _dp_tokens, _dp_rows
    _dp_tokens, _dp_rows = tokens, None


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
                     slot: torch.Tensor, run_experts, lay: EPLayout) -> torch.Tensor:
    """The routed-expert output of this DP rank's tokens ``x`` [T, H] (replicated over its TP ranks) with the
    ``alltoall`` backend.

    ``owner`` / ``slot`` map a global expert id to its EP rank and its index there; ``run_experts(rows,
    local_ids)`` runs this rank's experts on received rows. Returns [T, H], the same on the TP ranks.
    """
    sizes = token_slices(x.shape[0], lay.tp_size)
    start = sum(sizes[:lay.tp_rank])
    mine = slice(start, start + sizes[lay.tp_rank])
    ids, k, ep_size = topk_ids[mine].flatten(), topk_ids.shape[1], lay.ep_size
    dest = owner[ids]
    order = torch.argsort(dest * owner.numel() + slot[ids], stable=True)  # by rank, then by expert
    token = order // k
    send_counts = torch.bincount(dest, minlength=ep_size)
    recv_counts = device.all_to_all(send_counts, [1] * ep_size, [1] * ep_size, lay.ep_group)  # counts first
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = device.all_to_all(x[mine][token], send, recv, lay.ep_group)  # dispatch
    recv_e = device.all_to_all(slot[ids[order]], send, recv, lay.ep_group)
    back = device.all_to_all(run_experts(recv_x, recv_e), recv, send, lay.ep_group)  # combine
    weighted = back * topk_weights[mine].flatten()[order, None]
    out = torch.zeros((max(sizes), x.shape[1]), dtype=x.dtype, device=x.device)
    out.index_add_(0, token, weighted)
    return _gather_slices(out, sizes, lay)


def gather_dp_tokens(x: torch.Tensor, lay: EPLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DP+EP ``allgather_reducescatter``, first half: every EP rank's slice of its DP rank's tokens, gathered.

    Returns (all slices [EP x width, H], padded to the widest; the indices of the real rows in it; which of those
    real rows are this DP rank's own tokens).
    """
    width = -(-max(_dp_tokens) // lay.tp_size)
    sizes = token_slices(x.shape[0], lay.tp_size)
    start = sum(sizes[:lay.tp_rank])
    padded = x.new_zeros((width, x.shape[1]))
    padded[:sizes[lay.tp_rank]] = x[start:start + sizes[lay.tp_rank]]
    everyone = device.all_gather(padded, lay.ep_group)
    global _dp_rows
    if _dp_rows is None:  # the same for every MoE layer of the step
        rows, own = [], []
        for r in range(lay.ep_size):  # EP rank r holds TP slice r % TP of DP rank r // TP's tokens
            dp_rank, tp_rank = divmod(r, lay.tp_size)
            n = token_slices(_dp_tokens[dp_rank], lay.tp_size)[tp_rank]
            rows.extend(range(r * width, r * width + n))
            own.extend([dp_rank == lay.dp_rank] * n)
        _dp_rows = torch.tensor(rows, device=x.device), torch.tensor(own, dtype=torch.bool, device=x.device)
    return everyone, *_dp_rows


def return_dp_tokens(partial: torch.Tensor, num_tokens: int, lay: EPLayout) -> torch.Tensor:
    """DP+EP ``allgather_reducescatter``, second half: sum every rank's partial expert outputs [EP x width, H],
    keep this rank's slice, and give the TP ranks their DP rank's [num_tokens, H] back."""
    width = partial.shape[0] // lay.ep_size
    device.all_reduce(partial, lay.ep_group)
    return _gather_slices(partial[lay.ep_rank * width:(lay.ep_rank + 1) * width],
                          token_slices(num_tokens, lay.tp_size), lay)


def _gather_slices(out: torch.Tensor, sizes: list[int], lay: EPLayout) -> torch.Tensor:
    """The TP ranks' slices (``out``: this rank's, padded to equal shapes) back in token order, on every TP rank."""
    if lay.tp_size == 1:
        return out[:sizes[0]]
    gathered = device.all_gather(out, lay.tp_group).view(lay.tp_size, out.shape[0], -1)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
