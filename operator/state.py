"""Observed state as plain values: engine pods (`PodView`), parsed by pure functions (engine load is the
contract's `LoadReport`).

The planner works on these instead of raw API objects, so it is a pure function that unit tests drive with
hand-written pods. Everything the reconciler needs to remember lives in the pods' labels and annotations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pypto_serving import contract

# Container waiting reasons that mean the replica cannot come up by itself.
BAD_WAITING = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
               "CreateContainerError", "InvalidImageName", "RunContainerError")
CRASH_RESTARTS = 3  # a not-ready container restarted this often counts as crash-looping


def parse_time(value: Any) -> float | None:
    """RFC 3339 (or epoch seconds) -> epoch seconds; None when absent or unparsable."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch: float) -> str:
    """Epoch seconds -> RFC 3339 UTC with a Z suffix (Kubernetes style)."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one engine pod."""

    name: str
    rank: int
    spec_hash: str | None = None
    phase: str = "Pending"
    ready: bool = False
    deleting: bool = False
    draining: bool = False
    drain_started: float | None = None
    drain_reason: str | None = None
    node: str | None = None
    ip: str | None = None
    devices: str | None = None
    problem: str | None = None  # reason the replica is unhealthy (Unschedulable, CrashLoopBackOff, Evicted...)
    problem_message: str | None = None
    created: float | None = None
    # serving groups (defaults: a pod of a one-pod group, which carries none of the group labels)
    group_pod: int = 0
    group_size: int = 1
    serves: bool = True
    group_complete: bool = False  # the leader of a multi-pod group: all its pods were created
    group_ready: str | None = None  # the group-ready label as observed on a serving pod of a multi-pod group

    @property
    def failed(self) -> bool:
        """The pod is finished (evicted, failed, or exited): it must be deleted and replaced."""
        return self.phase in ("Failed", "Succeeded") and not self.deleting

    @property
    def active(self) -> bool:
        """Counts as a serving (or soon serving) replica."""
        return not (self.deleting or self.draining or self.failed)


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _problem(phase: str, status: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Why a pod cannot serve, from its status (scheduler conditions, container states, eviction)."""
    if phase == "Failed":
        return status.get("reason") or "PodFailed", status.get("message") or "the pod failed"
    scheduled = _condition(status, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        return scheduled.get("reason") or "Unschedulable", scheduled.get("message") or ""
    for cstat in status.get("containerStatuses") or []:
        waiting = (cstat.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BAD_WAITING:
            return waiting["reason"], waiting.get("message") or f"container {cstat.get('name')} cannot start"
        if not cstat.get("ready") and int(cstat.get("restartCount") or 0) >= CRASH_RESTARTS:
            return "CrashLoopBackOff", f"container {cstat.get('name')} restarted {cstat['restartCount']} times"
    return None, None


def _int_label(labels: Mapping[str, Any], key: str, default: int) -> int:
    try:
        return int(labels[key])
    except (KeyError, TypeError, ValueError):
        return default


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """Parse an engine pod (a dict as returned by the API); None when it carries no valid rank label."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    rank = _int_label(labels, contract.L_RANK, -1)
    if rank < 0:
        return None
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    ready_cond = _condition(status, "Ready")
    problem, message = _problem(phase, status)
    return PodView(
        name=meta.get("name", ""), rank=rank, spec_hash=labels.get(contract.L_HASH), phase=phase,
        ready=bool(ready_cond and ready_cond.get("status") == "True") and not meta.get("deletionTimestamp"),
        deleting=bool(meta.get("deletionTimestamp")), draining=labels.get(contract.L_DRAINING) == "true",
        drain_started=parse_time(annotations.get(contract.A_DRAIN_STARTED)),
        drain_reason=annotations.get(contract.A_DRAIN_REASON),
        node=(pod.get("spec") or {}).get("nodeName"), ip=status.get("podIP"),
        devices=annotations.get(contract.A_REAL_DEVICES), problem=problem, problem_message=message,
        created=parse_time(meta.get("creationTimestamp")),
        group_pod=_int_label(labels, contract.L_GROUP_POD, 0),
        group_size=max(1, _int_label(labels, contract.L_GROUP_SIZE, 1)),
        serves=labels.get(contract.L_SERVES, "true") == "true",
        group_complete=annotations.get(contract.A_GROUP_COMPLETE) == "true",
        group_ready=labels.get(contract.L_GROUP_READY))
