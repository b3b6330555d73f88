"""Tensor-parallel linear layers (Megatron style): column-parallel shards outputs, row-parallel shards inputs.

Each parameter carries a ``weight_loader(param, tensor[, shard_id])`` that copies this rank's slice of a
checkpoint tensor. With a single rank (no process group) they are plain linears. A device may replace the matmul
after loading (``kernel``: e.g. oneDNN with a prepacked weight on cpu, engine/cpu_matmul.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_TP_GROUP: dist.ProcessGroup | None = None  # None: the default process group (the whole world is one stage)


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    """Use ``group`` (this pipeline stage's ranks) for the tensor-parallel collectives; set before building."""
    global _TP_GROUP
    _TP_GROUP = group


def tp_group() -> dist.ProcessGroup | None:
    """The tensor-parallel group of this rank (None: the default group)."""
    return _TP_GROUP


def tp_rank_size() -> tuple[int, int]:
    """(rank, world size) in the tensor-parallel group, or (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(_TP_GROUP), dist.get_world_size(_TP_GROUP)
    return 0, 1


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


Kernel = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (x, bias) -> x W^T + bias


def matmul(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias through the module's device kernel when one was installed, else ``F.linear``."""
    kernel: Kernel | None = module.kernel
    return kernel(x, bias) if kernel is not None else F.linear(x, module.weight, bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; the output stays sharded."""

    kernel: Kernel | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        if output_size % self.tp_size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {self.tp_size}")
        self.weight = _param(output_size // self.tp_size, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size // self.tp_size) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's rows."""
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj + up_proj); each part is sharded separately."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        """Copy this rank's rows of part ``shard_id`` into its slot of the merged parameter."""
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; q heads are split across ranks, kv heads split or replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        rank, tp = tp_rank_size()
        if num_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
            raise ValueError(f"{num_heads} attention heads / {num_kv_heads} kv heads cannot be split over "
                             f"tensor_parallel_size {tp}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)  # kv heads are replicated when tp > num_kv_heads
        self.kv_shard = rank * num_kv_heads // tp if tp > num_kv_heads else rank
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str = "q") -> None:
        """Copy this rank's heads of ``shard_id`` (q|k|v) into its slot of the merged parameter."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, index = 0, q_size, self.tp_rank
        else:
            offset, size, index = q_size + (kv_size if shard_id == "v" else 0), kv_size, self.kv_shard
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, index * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial outputs are all-reduced."""

    kernel: Kernel | None = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        if input_size % self.tp_size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {self.tp_size}")
        self.weight = _param(output_size, input_size // self.tp_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's columns (the bias is whole on every rank and added once, by rank 0)."""
        if param.dim() == 1:
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(self, x, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y, group=_TP_GROUP)
        return y
