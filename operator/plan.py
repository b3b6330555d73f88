"""Pure planning: observed pods + spec -> actions (create, drain, delete), status and events.

Level-triggered: the plan depends only on what is observed now (pods with their labels and annotations,
engine loads, the clock), never on what an earlier reconcile did, so any reconcile - after a restart too -
continues where the last one stopped. Rules:

* A missing replica is created at the lowest free rank (a rank is free when no pod has its name).
* Scale-down drains the excess replicas; victims are, in order: not Ready, on an old spec, least in-flight
  work, highest rank. A draining pod is deleted once its `/load` shows no running or waiting work, or when
  `drain.timeoutSeconds` have passed since the drain started.
* Rolling update (spec hash changed): old replicas are drained while Ready replicas stay >= replicas -
  maxUnavailable; replicas plus rollout-drained pods stay <= replicas + maxSurge, so with maxSurge 0 a
  replacement reuses the drained replica's rank and starts once the old pod is gone.
* A failed (evicted, exited) pod is deleted and a replacement created.

The unit of all of this is a serving group (groups.py): a plain replica is a group of one pod. A multi-pod group
is created leader first, its other pods once the leader has an IP (their rendezvous address), then the leader is
annotated complete. Any pod of it failing, being deleted or missing deletes the whole group (a distributed world
cannot take back one rank); a group not fully scheduled within ``groupStartTimeoutSeconds`` is deleted too and no
multi-pod group is created for as long again (``status.lastGroupStartFailure``). Scale-down and rollouts drain
whole groups (their serving pods), and the serving pods carry ``group-ready`` for the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pypto_serving.contract import A_GROUP_COMPLETE, L_GROUP_READY, LoadReport
from pypto_serving.operator import desired as d
from pypto_serving.operator.groups import GroupView, group_shape, group_views
from pypto_serving.operator.state import PodView, format_time, parse_time
from pypto_serving.operator.status import Event, condition, group_statuses, replica_statuses, stamp, transition_events
from pypto_serving.operator.types import (
    Condition,
    GatewayStatus,
    GroupStartFailure,
    PyptoServingSpec,
    PyptoServingStatus,
)
from pypto_serving.operator.validation import Problem, summary

SCALE_DOWN, ROLLOUT = "scale-down", "rollout"
START_TIMEOUT = "GroupStartTimeout"
REQUEUE_DRAINING = 1.0  # seconds between /load polls of draining replicas
REQUEUE_PROGRESSING = 10.0  # a safety net: pod events already trigger reconciles
UNKNOWN_LOAD = 10**9  # a Ready replica whose load is unknown is assumed busy (never drained first)


@dataclass(frozen=True)
class CreatePod:
    """Create the engine pod of group ``rank`` (pod ``index`` of a multi-pod group; its workers get the leader's
    IP)."""

    rank: int
    reason: str
    index: int = 0
    leader_ip: str | None = None


@dataclass(frozen=True)
class LabelPod:
    """Set one label (or annotation) on a pod: group-ready on serving pods, group-complete on a leader."""

    pod: str
    key: str
    value: str
    annotation: bool = False


@dataclass(frozen=True)
class StartDrain:
    """Label the pod draining (stamping the start time unless already draining) and `POST /drain` to it."""

    pod: str
    reason: str
    ip: str | None = None
    restamp: bool = True


@dataclass(frozen=True)
class DeletePod:
    """Delete a pod (drained, drain timed out, failed, or draining but not serving)."""

    pod: str
    reason: str


Action = CreatePod | StartDrain | DeletePod | LabelPod


@dataclass(frozen=True)
class Observed:
    """Everything a reconcile observed about one PyptoServing."""

    name: str
    namespace: str
    generation: int
    spec: PyptoServingSpec | None
    problems: Sequence[Problem]
    pods: Sequence[PodView]
    loads: Mapping[str, LoadReport]
    now: float
    previous_status: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What to do, the status to write, events to post, and when to look again."""

    actions: list[Action] = field(default_factory=list)
    status: PyptoServingStatus = field(default_factory=PyptoServingStatus)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    start_failure: GroupStartFailure | None = None  # a group deleted by this plan for its start timeout


def loads_needed(spec: PyptoServingSpec | None, pods: Sequence[PodView]) -> list[PodView]:
    """Serving pods whose `/load` the planner needs: draining ones, and all Ready ones when a drain may be chosen."""
    if spec is None:
        return []
    h = d.spec_hash(spec)
    active = [g for g in group_views(pods) if g.active]
    choosing = len(active) > spec.replicas or any(g.spec_hash != h for g in active)
    return [p for p in pods if p.ip and p.phase == "Running" and not p.deleting and not p.failed and p.serves
            and (p.draining or (choosing and p.active and p.ready))]


def _in_flight(pod: PodView, loads: Mapping[str, LoadReport]) -> int:
    load = loads.get(pod.name)
    if load is not None:
        return load.in_flight
    return UNKNOWN_LOAD if pod.ready else 0


def group_in_flight(group: GroupView, loads: Mapping[str, LoadReport]) -> int:
    """Requests not finished on the group's serving pods."""
    return sum(_in_flight(p, loads) for p in group.serving)


def victim_order(groups: Sequence[GroupView], current_hash: str, loads: Mapping[str, LoadReport]) -> list[GroupView]:
    """Groups sorted best-victim first: not Ready, old spec, least in-flight work, highest index."""
    return sorted(groups, key=lambda g: (g.ready, g.spec_hash == current_hash, group_in_flight(g, loads), -g.index))


def lowest_free_ranks(pods: Sequence[PodView], count: int) -> list[int]:
    """The ``count`` lowest group indexes (dp-rank labels) that no pod (in any state) holds."""
    taken = {p.rank for p in pods}
    out, rank = [], 0
    while len(out) < count:
        if rank not in taken:
            out.append(rank)
        rank += 1
    return out


def _delete_group(group: GroupView, reason: str, plan: Plan) -> None:
    for pod in group.pods:
        if not pod.deleting:
            plan.actions.append(DeletePod(pod.name, reason))


def _drain_group(group: GroupView, reason: str, plan: Plan) -> None:
    """Label every serving pod draining and `POST /drain` to it."""
    for pod in group.serving:
        if not pod.deleting:
            plan.actions.append(StartDrain(pod.name, reason, pod.ip))


def _finish_drain(obs: Observed, spec: PyptoServingSpec, group: GroupView, plan: Plan) -> None:
    """A draining group: deleted whole once every serving pod is idle (or not serving), or on the timeout;
    serving pods not labelled yet (the operator stopped half-way) are drained too."""
    timeout, reason = spec.drain.timeout_seconds, group.drain_reason or SCALE_DOWN
    serving = [p for p in group.serving if not p.deleting and not p.failed]
    idle: list[str] = []
    for pod in serving:
        load = obs.loads.get(pod.name)
        if pod.phase != "Running" or not pod.ip:
            idle.append("not-serving")
        elif pod.draining and load is not None and load.in_flight == 0:
            idle.append("drained")
    if len(idle) == len(serving):
        _delete_group(group, "not-serving" if "not-serving" in idle else "drained", plan)
        return
    starts = [p.drain_started for p in serving if p.drain_started is not None]
    if starts and obs.now - min(starts) >= timeout:
        _delete_group(group, "drain-timeout", plan)
        names = ", ".join(p.name for p in group.pods)
        plan.events.append(Event("Warning", "DrainTimeout", f"pod {names} still had work after {timeout}s of "
                                 "draining; deleting it"))
        return
    for pod in serving:
        load = obs.loads.get(pod.name)
        if pod.phase != "Running" or not pod.ip:
            continue
        if not pod.draining or pod.drain_started is None:
            plan.actions.append(StartDrain(pod.name, reason, pod.ip, restamp=True))
        elif load is not None and not load.draining:  # the operator stopped between labelling and POST /drain
            plan.actions.append(StartDrain(pod.name, reason, pod.ip, restamp=False))


def _heal(obs: Observed, spec: PyptoServingSpec, group: GroupView, plan: Plan) -> bool:
    """Failed pods and broken or stuck groups are deleted (whole, for multi-pod groups); True if it was."""
    if not group.multi:
        failed = [p for p in group.pods if p.failed]
        for pod in failed:
            plan.actions.append(DeletePod(pod.name, "failed"))
            plan.events.append(Event("Warning", "ReplicaFailed", f"pod {pod.name} failed ({pod.problem}: "
                                     f"{pod.problem_message}); replacing it"))
        return bool(failed)
    why = group.broken()
    if why is not None:
        _delete_group(group, "group-failed", plan)
        plan.events.append(Event("Warning", "GroupFailed", f"serving group {group.index}: {why}; deleting all "
                                 f"{len(group.pods)} of its pods to recreate it"))
        return True
    timeout, created = spec.group_start_timeout_seconds, group.created
    pending = [p for p in group.pods if p.problem == "Unschedulable" or (p.phase == "Pending" and not p.node)]
    if not group.ready and pending and created is not None and obs.now - created >= timeout:
        detail = "; ".join(f"pod {p.name}: {p.problem_message or 'not scheduled'}" for p in pending)
        message = (f"serving group {group.index} was not fully scheduled within {timeout}s ({detail}); deleted its "
                   f"pods to release their devices, retrying in {timeout}s")
        _delete_group(group, "start-timeout", plan)
        plan.events.append(Event("Warning", START_TIMEOUT, message))
        plan.start_failure = GroupStartFailure(group=group.index, time=format_time(obs.now), message=message)
        return True
    return False


def _complete(group: GroupView, h: str, plan: Plan) -> None:
    """Create the missing pods of a multi-pod group once its leader has an IP; then mark it complete."""
    lead = group.leader
    if not group.multi or lead is None or lead.group_complete or group.draining:
        return
    if lead.spec_hash != h:  # half a group of an old spec: it can never be completed
        _delete_group(group, "incomplete", plan)
        return
    if not lead.ip:
        return
    for index in range(1, group.size):
        if group.pod(index) is None:
            plan.actions.append(CreatePod(group.index, "group", index=index, leader_ip=lead.ip))
    plan.actions.append(LabelPod(lead.name, A_GROUP_COMPLETE, "true", annotation=True))


def _group_ready_labels(groups: Sequence[GroupView], plan: Plan) -> None:
    """The gateway routes to a serving pod of a multi-pod group only while its label says the group is Ready."""
    for group in groups:
        if not group.multi:
            continue
        want = "true" if group.ready and group.active else "false"
        for pod in group.serving:
            if not pod.deleting and pod.group_ready != want:
                plan.actions.append(LabelPod(pod.name, L_GROUP_READY, want))


def _backing_off(obs: Observed, spec: PyptoServingSpec) -> GroupStartFailure | None:
    """The last group start failure, while creating multi-pod groups waits after it."""
    raw = obs.previous_status.get("lastGroupStartFailure")
    if not isinstance(raw, Mapping):
        return None
    failure = GroupStartFailure.model_validate(raw)
    at = parse_time(failure.time)
    if at is None or obs.now - at >= spec.group_start_timeout_seconds:
        return None
    return failure


def _plan_groups(obs: Observed, spec: PyptoServingSpec, plan: Plan) -> tuple[list[GroupView], int, int]:
    """Decide creations, drains and deletions; return the groups left active, groups created, and updated ones."""
    n, surge, unavailable = spec.replicas, spec.rollout.max_surge, spec.rollout.max_unavailable
    h = d.spec_hash(spec)
    groups = group_views(obs.pods)
    live = []
    for group in groups:
        if group.deleting or _heal(obs, spec, group, plan):
            continue
        if group.draining:
            _finish_drain(obs, spec, group, plan)
            continue
        _complete(group, h, plan)
        live.append(group)
    active = [g for g in live if g.active]
    held = [g for g in groups if (g.draining or g.deleting) and g.drain_reason == ROLLOUT]

    # Scale down: drain the excess (during a rollout, up to maxSurge extra groups are expected).
    has_old = any(g.spec_hash != h for g in active)
    excess = len(active) - (n + (surge if has_old else 0))
    if excess > 0:
        for victim in victim_order(active, h, obs.loads)[:excess]:
            _drain_group(victim, SCALE_DOWN, plan)
            active.remove(victim)
        plan.events.append(Event("Normal", "ScalingDown", f"draining {excess} replica(s) to scale down to {n}"))

    # Rolling update: drain old groups while enough stay Ready.
    ready = sum(g.ready for g in active)
    old = [g for g in active if g.spec_hash != h]
    for victim in victim_order(old, h, obs.loads):
        if victim.ready and ready - 1 < n - unavailable:
            break
        _drain_group(victim, ROLLOUT, plan)
        names = ", ".join(p.name for p in victim.serving) or f"group {victim.index}"
        plan.events.append(Event("Normal", "ReplacingReplica", f"draining pod {names} (spec "
                                 f"{victim.spec_hash} -> {h}) for a rolling update"))
        active.remove(victim)
        held.append(victim)
        ready -= victim.ready
    _group_ready_labels(live, plan)

    # Create the missing groups on the current spec, within replicas + maxSurge (a multi-pod group: its leader
    # first, the other pods once the leader has an IP; none while backing off after a start timeout).
    current = [g for g in active if g.spec_hash == h]
    count = max(0, min(n - len(current), n + surge - len(active) - len(held)))
    if count and group_shape(spec).multi and (plan.start_failure or _backing_off(obs, spec)):
        count = 0
    if count:
        reason = "rollout" if has_old or held else "scale-up"
        for rank in lowest_free_ranks(obs.pods, count):
            plan.actions.append(CreatePod(rank, reason))
        if reason == "scale-up":
            plan.events.append(Event("Normal", "ScalingUp", f"creating {count} replica(s) to reach {n}"))
    return active, count, len(current) + count


def _invalid(obs: Observed) -> Plan:
    message = summary(list(obs.problems))
    conditions = [condition("SpecValid", False, "InvalidSpec", message),
                  condition("Ready", False, "InvalidSpec", "the spec is invalid"),
                  condition("Progressing", False, "InvalidSpec", "the spec is invalid")]
    previous = obs.previous_status
    status = PyptoServingStatus(observed_generation=obs.generation, phase="Invalid",
                                conditions=stamp(conditions, previous, obs.now, obs.generation),
                                replica_statuses=replica_statuses(obs.pods), groups=group_statuses(obs.pods))
    return Plan(status=status, events=transition_events(conditions, previous))


def _degraded(obs: Observed, troubled: Sequence[PodView], failure: GroupStartFailure | None) -> Condition:
    if failure is not None:
        return condition("Degraded", True, START_TIMEOUT, failure.message)
    if troubled:
        return condition("Degraded", True, troubled[0].problem or "Unhealthy",
                          "; ".join(f"pod {p.name}: {p.problem_message or p.problem}" for p in troubled))
    return condition("Degraded", False, "AsExpected")


def plan(obs: Observed) -> Plan:
    """The whole reconcile decision for one PyptoServing."""
    spec = obs.spec
    if spec is None:
        return _invalid(obs)
    out = Plan()
    n, h, shape = spec.replicas, d.spec_hash(spec), group_shape(spec)
    active, created, updated = _plan_groups(obs, spec, out)
    ready = sum(g.ready for g in active)
    draining = [g for g in group_views(obs.pods) if g.draining]
    old = [g for g in active if g.spec_hash != h]
    troubled = [p for p in obs.pods if p.problem and not p.deleting]
    failure = out.start_failure or _backing_off(obs, spec)
    converged = (len(active) == n and ready == n and not old and not draining and not created
                 and not any(isinstance(a, DeletePod | StartDrain | CreatePod) for a in out.actions))
    min_available = max(0, n - spec.rollout.max_unavailable)

    if troubled or failure is not None:
        phase = "Degraded"
    elif converged:
        phase = "Ready"
    elif n > 0 and ready == 0:
        phase = "Pending"
    else:
        phase = "Progressing"
    if old or any(g.drain_reason == ROLLOUT for g in draining):
        progress = "RollingUpdate"
    elif len(active) + created < n or created:
        progress = "ScalingUp"
    elif draining or any(isinstance(a, StartDrain) for a in out.actions):
        progress = "ScalingDown"
    else:
        progress = "WaitingForReady"
    conditions = [
        condition("SpecValid", True, "Valid"),
        condition("Ready", converged, "AllReplicasReady" if converged else "ReplicasNotReady",
                   f"{ready}/{n} replicas ready"),
        condition("Available", ready >= min_available and (n == 0 or ready > 0),
                   "MinimumReplicasAvailable" if ready >= min_available else "MinimumReplicasUnavailable",
                   f"{ready} ready, at least {min_available} required"),
        condition("Progressing", not converged, "Converged" if converged else progress),
        _degraded(obs, troubled, failure),
    ]
    previous = obs.previous_status
    owner = d.Owner(obs.name, obs.namespace, "")
    last_failure = out.start_failure
    if last_failure is None and isinstance(previous.get("lastGroupStartFailure"), Mapping):
        last_failure = GroupStartFailure.model_validate(previous["lastGroupStartFailure"])
    out.status = PyptoServingStatus(
        observed_generation=obs.generation,
        replicas=len(active) + created,
        ready_replicas=ready,
        updated_replicas=updated,
        devices_per_replica=spec.devices_per_replica,
        pods_per_group=shape.pods,
        devices_per_pod=shape.devices_per_pod,
        device_resource_name=spec.devices.resource_name,
        selector=d.selector_string(d.engine_selector(obs.name)),
        spec_hash=h,
        phase=phase,
        conditions=stamp(conditions, previous, obs.now, obs.generation),
        replica_statuses=replica_statuses(obs.pods),
        groups=group_statuses(obs.pods),
        last_group_start_failure=last_failure,
        gateway=(GatewayStatus(service=d.gateway_name(obs.name), url=d.gateway_url(owner))
                 if spec.gateway.enabled else None),
    )
    out.events += transition_events(conditions, previous)
    if draining or any(isinstance(a, StartDrain) for a in out.actions):
        out.requeue_after = REQUEUE_DRAINING
    elif not converged or failure is not None:
        out.requeue_after = REQUEUE_PROGRESSING
    return out
