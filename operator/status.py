"""Pure status building: conditions with their transition times, the events their transitions post, and the
per-pod and per-group status of the observed pods (the planner, plan.py, decides the rest)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pypto_serving.contract import ROLE_LEADER, ROLE_WORKER
from pypto_serving.operator.groups import group_views
from pypto_serving.operator.state import PodView, format_time
from pypto_serving.operator.types import Condition, ConditionType, GroupStatus, ReplicaStatus


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the PyptoServing."""

    type: str
    reason: str
    message: str


def condition(kind: ConditionType, ok: bool, reason: str, message: str = "") -> Condition:
    """A condition, True when ``ok``."""
    # the 1.20 apiserver rejects "" for a string field in a CRD status as null: no message is None, not ""
    return Condition(type=kind, status="True" if ok else "False", reason=reason, message=message or None)


def previous_conditions(previous: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The stored status' conditions by type."""
    return {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}


def stamp(conditions: list[Condition], previous: Mapping[str, Any], now: float, generation: int) -> list[Condition]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = previous_conditions(previous)
    for cond in conditions:
        old = before.get(cond.type)
        same = old is not None and old.get("status") == cond.status and old.get("lastTransitionTime")
        cond.last_transition_time = old["lastTransitionTime"] if same else format_time(now)
        cond.observed_generation = generation
    return conditions


def transition_events(conditions: list[Condition], previous: Mapping[str, Any]) -> list[Event]:
    """Events for conditions that changed: Degraded, an invalid spec, Ready."""
    before = previous_conditions(previous)
    out = []
    for cond in conditions:
        old = before.get(cond.type) or {}
        changed = old.get("status") != cond.status or old.get("reason") != cond.reason
        if cond.type == "Degraded" and cond.status == "True" and changed:
            out.append(Event("Warning", cond.reason, cond.message or cond.reason))
        if cond.type == "SpecValid" and cond.status == "False" and changed:
            out.append(Event("Warning", "InvalidSpec", cond.message or "invalid spec"))
        if cond.type == "Ready" and cond.status == "True" and changed:
            out.append(Event("Normal", "Ready", cond.message or "all replicas ready"))
    return out


def pod_status(pod: PodView) -> ReplicaStatus:
    """One pod's status entry (its index and role only in a multi-pod group)."""
    multi = pod.group_size > 1
    return ReplicaStatus(rank=pod.rank, pod=pod.name, node=pod.node, devices=pod.devices, phase=pod.phase,
                         ready=pod.ready, draining=pod.draining, spec_hash=pod.spec_hash,
                         group_pod=pod.group_pod if multi else None,
                         role=(ROLE_WORKER if pod.group_pod else ROLE_LEADER) if multi else None)


def replica_statuses(pods: Sequence[PodView]) -> list[ReplicaStatus]:
    """Every pod not being deleted, by group and index."""
    return [pod_status(pod) for pod in sorted(pods, key=lambda p: (p.rank, p.group_pod)) if not pod.deleting]


def group_statuses(pods: Sequence[PodView]) -> list[GroupStatus]:
    """Every group not being deleted: Ready, draining, its serving pods and its pods."""
    return [GroupStatus(group=g.index, ready=g.ready, draining=g.draining, spec_hash=g.spec_hash,
                        serving=[p.name for p in g.serving if not p.deleting],
                        pods=[pod_status(p) for p in g.pods if not p.deleting])
            for g in group_views(pods) if not g.deleting]
