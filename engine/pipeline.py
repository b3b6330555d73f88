"""Pipeline parallelism: which decoder layers a stage holds, and the stage-to-stage activation link.

A stage is ``tensor_parallel_size`` ranks wide; global rank ``stage * tp + tp_rank`` holds layers
``[start, end)`` of the model. A replica spanning nodes numbers its stages the other way round (``leader_last``:
rank 0's block of TP ranks is the LAST stage), so the leader node, which runs the scheduler and collects the
sampled tokens, holds the sampling stage and the first stage runs on another node. Between neighbouring stages,
each TP rank sends its (replicated) hidden states and residual to the same TP rank of the next stage with
``torch.distributed`` point-to-point isend/irecv on the world group: one tag per micro-batch slot, no collective
over all stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def partition_layers(num_layers: int, num_stages: int, spec: str | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` layer ranges of the stages: ``spec`` ("2,1" = 2 then 1 layers), else an even split.

    The even split gives the earlier stages the remainder's extra layers (the last stage also runs the LM head).
    ValueError when a stage would get no layer or ``spec`` does not add up.
    """
    if spec:
        try:
            sizes = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"pp_layer_partition: expected comma-separated layer counts like '2,1', got {spec!r}"
                             ) from None
        if len(sizes) != num_stages:
            raise ValueError(f"pp_layer_partition: {spec!r} has {len(sizes)} stages, pipeline_parallel_size is "
                             f"{num_stages}")
        if min(sizes) < 1 or sum(sizes) != num_layers:
            raise ValueError(f"pp_layer_partition: {spec!r} must give every stage at least one layer and add up to "
                             f"the model's {num_layers} layers")
    else:
        if num_stages > num_layers:
            raise ValueError(f"pipeline_parallel_size: {num_stages} stages for a model of {num_layers} layers")
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def stage_of_rank(rank: int, tp: int, pp: int, leader_last: bool = False) -> int:
    """The pipeline stage of global rank ``rank`` (``rank // tp``, or counted from the last one)."""
    block = rank // tp
    return pp - 1 - block if leader_last else block


def rank_of_stage(stage: int, tp_rank: int, tp: int, pp: int, leader_last: bool = False) -> int:
    """The global rank of TP rank ``tp_rank`` of stage ``stage`` (the inverse of `stage_of_rank`)."""
    block = pp - 1 - stage if leader_last else stage
    return block * tp + tp_rank


@dataclass(frozen=True)
class Stage:
    """Stage ``index`` of ``size``, holding decoder layers ``[start, end)``."""

    index: int
    size: int
    start: int
    end: int

    @property
    def first(self) -> bool:
        """Holds the embedding."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """Holds the final norm, LM head and sampler."""
        return self.index == self.size - 1

    def owns_layer(self, layer: int) -> bool:
        return self.start <= layer < self.end


class StageLink:
    """Point-to-point activations between this rank and its peers (same TP rank) in the neighbouring stages.

    ``send`` is asynchronous: the handle and tensor are kept until the slot is used again (by then the receiver has
    taken it: a slot comes back to the scheduler only after its micro-batch left the last stage).
    """

    def __init__(self, stage: Stage, rank: int, tp: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, leader_last: bool = False) -> None:
        self.stage, self.hidden_size, self.dtype, self.device = stage, hidden_size, dtype, device
        tp_rank = rank % tp
        self.prev = None if stage.first else rank_of_stage(stage.index - 1, tp_rank, tp, stage.size, leader_last)
        self.next = None if stage.last else rank_of_stage(stage.index + 1, tp_rank, tp, stage.size, leader_last)
        self._sends: dict[int, tuple[dist.Work, torch.Tensor]] = {}

    def recv(self, slot: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and residual [num_tokens, hidden] of micro-batch slot ``slot`` from the previous stage."""
        buf = torch.empty((2, num_tokens, self.hidden_size), dtype=self.dtype, device=self.device)
        dist.irecv(buf, src=self.prev, tag=slot).wait()
        return buf[0], buf[1]

    def send(self, slot: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Start sending micro-batch slot ``slot``'s activations to the next stage (returns at once)."""
        previous = self._sends.pop(slot, None)
        if previous is not None:
            previous[0].wait()
        buf = torch.stack((hidden, residual)).contiguous()
        self._sends[slot] = (dist.isend(buf, dst=self.next, tag=slot), buf)

    def send_zeros(self, slot: int, num_tokens: int) -> None:
        """Keep the next stage from waiting forever when this stage failed on a micro-batch (its result is
        discarded: the engine sees this stage's error)."""
        zeros = torch.zeros((num_tokens, self.hidden_size), dtype=self.dtype, device=self.device)
        self.send(slot, zeros, zeros)
