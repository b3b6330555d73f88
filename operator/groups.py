"""Serving groups as plain values: the shape a spec asks for (`GroupShape`) and the groups observed (`GroupView`).

A replica (the unit of ``spec.replicas``) is a serving group of ``pods`` engine pods that are created, healed,
scaled and drained as one. A plain replica is a group of one pod, named and labelled as it always was
(``<name>-dp-<g>``). A multi-pod group's pods are ``<name>-dp-<g>-<i>``; pod 0 is the leader. Two kinds:

* a large replica (``TP x PP > devices.perNode``): ``ceil(TP x PP / perNode)`` pods, each with the even share of
  the devices; only the leader serves (OpenAI server + scheduler), the workers run model ranks;
* a DP+EP group (``parallel.dataParallelSize = D > 1``): D pods, each TP x PP devices, each a DP rank that serves.

Pure functions only; the planner (plan.py) decides what to do with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pypto_serving.operator.state import PodView
from pypto_serving.operator.types import PyptoServingSpec


@dataclass(frozen=True)
class GroupShape:
    """How many pods a group has, the devices of each, and which pods serve."""

    pods: int = 1
    devices_per_pod: int = 1
    all_serve: bool = False  # DP+EP: every rank serves; a large replica: only the leader

    @property
    def multi(self) -> bool:
        """More than one pod (rendezvous, group labels, restart-the-whole-group)."""
        return self.pods > 1

    def serves(self, index: int) -> bool:
        """Whether pod ``index`` of a group runs an OpenAI server."""
        return self.all_serve or index == 0


def split_problem(devices: int, per_node: int | None) -> str | None:
    """Why ``devices`` cannot be split evenly into pods of at most ``per_node`` devices, or None."""
    if per_node is None or devices <= per_node:
        return None
    pods = -(-devices // per_node)
    if devices % pods:
        return (f"{devices} devices do not split evenly into {pods} pods of at most {per_node} devices "
                f"(ceil({devices} / {per_node}) = {pods} pods)")
    return None


def group_shape(spec: PyptoServingSpec) -> GroupShape:
    """The group shape of a (resolved, valid) spec."""
    devices, per_node = spec.devices_per_replica, spec.devices.per_node
    dp = spec.parallel.data_parallel_size
    if dp > 1:
        return GroupShape(pods=dp, devices_per_pod=devices, all_serve=True)
    if per_node is not None and devices > per_node:
        pods = -(-devices // per_node)
        return GroupShape(pods=pods, devices_per_pod=devices // pods)
    return GroupShape(pods=1, devices_per_pod=devices)


@dataclass(frozen=True)
class GroupView:
    """The pods observed for one group index (any state), and what follows from them. The group's size comes
    from its pods' labels, so a group built from an older spec (another size) is judged by its own shape."""

    index: int
    pods: tuple[PodView, ...]

    @property
    def size(self) -> int:
        """Pods the group was built with."""
        return max((p.group_size for p in self.pods), default=1)

    @property
    def multi(self) -> bool:
        """A group of several pods."""
        return self.size > 1

    def pod(self, index: int) -> PodView | None:
        """Pod ``index`` of the group, if it exists."""
        return next((p for p in self.pods if p.group_pod == index), None)

    @property
    def leader(self) -> PodView | None:
        """Pod 0."""
        return self.pod(0)

    @property
    def spec_hash(self) -> str | None:
        """The spec hash the group was built from (its leader's, else any pod's)."""
        lead = self.leader or (self.pods[0] if self.pods else None)
        return lead.spec_hash if lead is not None else None

    @property
    def serving(self) -> list[PodView]:
        """Its pods that serve (OpenAI server)."""
        return [p for p in self.pods if p.serves]

    @property
    def deleting(self) -> bool:
        """Every pod is being deleted (or gone): the group is on its way out."""
        return all(p.deleting for p in self.pods)

    @property
    def draining(self) -> bool:
        """Some serving pod is labelled draining."""
        return any(p.draining for p in self.pods) and not self.deleting

    @property
    def drain_reason(self) -> str | None:
        """Why it drains (scale-down or rollout), from the serving pods' annotation."""
        return next((p.drain_reason for p in self.pods if p.drain_reason), None)

    @property
    def complete(self) -> bool:
        """Every pod exists (the leader was marked complete, or all pods are there)."""
        return len({p.group_pod for p in self.pods}) >= self.size

    @property
    def ready(self) -> bool:
        """Every pod exists and is Ready, and none is going away."""
        return self.complete and all(p.ready and not p.deleting for p in self.pods)

    @property
    def created(self) -> float | None:
        """When the group's first pod was created."""
        stamps = [p.created for p in self.pods if p.created is not None]
        return min(stamps) if stamps else None

    def broken(self) -> str | None:
        """Why a multi-pod group must be deleted whole, or None: a pod failed or is going away, or a pod is
        missing from a group that was complete (its leader says so), or the leader is missing."""
        if not self.multi or self.deleting:
            return None
        for p in self.pods:
            if p.failed:
                return f"pod {p.name} failed ({p.problem}: {p.problem_message})"
            if p.deleting:
                return f"pod {p.name} is being deleted"
        lead = self.leader
        if lead is None:
            return "its leader pod is gone"
        missing = [i for i in range(self.size) if self.pod(i) is None]
        if missing and lead.group_complete:
            return f"pod(s) {', '.join(map(str, missing))} of the group are gone"
        return None

    @property
    def active(self) -> bool:
        """Counts as a serving (or soon serving) replica."""
        if self.deleting or self.draining:
            return False
        if self.multi:
            return self.broken() is None
        return all(p.active for p in self.pods)


def group_views(pods: Sequence[PodView]) -> list[GroupView]:
    """The observed pods grouped by group index (the dp-rank label), lowest index first."""
    by_index: dict[int, list[PodView]] = {}
    for p in pods:
        by_index.setdefault(p.rank, []).append(p)
    return [GroupView(index, tuple(sorted(members, key=lambda p: p.group_pod)))
            for index, members in sorted(by_index.items())]
