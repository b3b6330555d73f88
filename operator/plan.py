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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pypto_serving.contract import LoadReport
from pypto_serving.operator import desired as d
from pypto_serving.operator.state import PodView, format_time
from pypto_serving.operator.types import (
    Condition,
    ConditionType,
    GatewayStatus,
    PyptoServingSpec,
    PyptoServingStatus,
    ReplicaStatus,
)
from pypto_serving.operator.validation import Problem, summary

SCALE_DOWN, ROLLOUT = "scale-down", "rollout"
REQUEUE_DRAINING = 1.0  # seconds between /load polls of draining replicas
REQUEUE_PROGRESSING = 10.0  # a safety net: pod events already trigger reconciles
UNKNOWN_LOAD = 10**9  # a Ready replica whose load is unknown is assumed busy (never drained first)


@dataclass(frozen=True)
class CreatePod:
    """Create the engine pod of ``rank``."""

    rank: int
    reason: str


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


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the PyptoServing."""

    type: str
    reason: str
    message: str


Action = CreatePod | StartDrain | DeletePod


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


def loads_needed(spec: PyptoServingSpec | None, pods: Sequence[PodView]) -> list[PodView]:
    """Pods whose `/load` the planner needs: draining ones, and all Ready ones when a drain may be chosen."""
    if spec is None:
        return []
    h = d.spec_hash(spec)
    active = [p for p in pods if p.active]
    choosing = len(active) > spec.replicas or any(p.spec_hash != h for p in active)
    return [p for p in pods if p.ip and p.phase == "Running" and not p.deleting and not p.failed
            and (p.draining or (choosing and p.active and p.ready))]


def _in_flight(pod: PodView, loads: Mapping[str, LoadReport]) -> int:
    load = loads.get(pod.name)
    if load is not None:
        return load.in_flight
    return UNKNOWN_LOAD if pod.ready else 0


def victim_order(pods: Sequence[PodView], current_hash: str, loads: Mapping[str, LoadReport]) -> list[PodView]:
    """Pods sorted best-victim first: not Ready, old spec, least in-flight work, highest rank."""
    return sorted(pods, key=lambda p: (p.ready, p.spec_hash == current_hash, _in_flight(p, loads), -p.rank))


def lowest_free_ranks(pods: Sequence[PodView], count: int) -> list[int]:
    """The ``count`` lowest ranks that no pod (in any state) holds."""
    taken = {p.rank for p in pods}
    out, rank = [], 0
    while len(out) < count:
        if rank not in taken:
            out.append(rank)
        rank += 1
    return out


def _finish_drains(obs: Observed, spec: PyptoServingSpec, plan: Plan) -> None:
    timeout = spec.drain.timeout_seconds
    for pod in obs.pods:
        if not pod.draining or pod.deleting or pod.failed:
            continue
        load = obs.loads.get(pod.name)
        if pod.phase != "Running" or not pod.ip:
            plan.actions.append(DeletePod(pod.name, "not-serving"))
        elif load is not None and load.in_flight == 0:
            plan.actions.append(DeletePod(pod.name, "drained"))
        elif pod.drain_started is None:
            plan.actions.append(StartDrain(pod.name, pod.drain_reason or SCALE_DOWN, pod.ip, restamp=True))
        elif obs.now - pod.drain_started >= timeout:
            plan.actions.append(DeletePod(pod.name, "drain-timeout"))
            plan.events.append(Event("Warning", "DrainTimeout", f"pod {pod.name} still had work after "
                                     f"{timeout}s of draining; deleting it"))
        elif load is not None and not load.draining:  # the operator stopped between labelling and POST /drain
            plan.actions.append(StartDrain(pod.name, pod.drain_reason or SCALE_DOWN, pod.ip, restamp=False))


def _plan_pods(obs: Observed, spec: PyptoServingSpec, plan: Plan) -> tuple[list[PodView], int, int]:
    """Decide creations and drains; return the replicas left active, pods created, and new pods created."""
    n, surge, unavailable = spec.replicas, spec.rollout.max_surge, spec.rollout.max_unavailable
    h = d.spec_hash(spec)
    for pod in obs.pods:
        if pod.failed:
            plan.actions.append(DeletePod(pod.name, "failed"))
            plan.events.append(Event("Warning", "ReplicaFailed", f"pod {pod.name} failed ({pod.problem}: "
                                     f"{pod.problem_message}); replacing it"))
    _finish_drains(obs, spec, plan)
    active = [p for p in obs.pods if p.active]
    held = [p for p in obs.pods if (p.draining or p.deleting) and p.drain_reason == ROLLOUT]

    # Scale down: drain the excess (during a rollout, up to maxSurge extra replicas are expected).
    has_old = any(p.spec_hash != h for p in active)
    excess = len(active) - (n + (surge if has_old else 0))
    if excess > 0:
        for victim in victim_order(active, h, obs.loads)[:excess]:
            plan.actions.append(StartDrain(victim.name, SCALE_DOWN, victim.ip))
            active.remove(victim)
        plan.events.append(Event("Normal", "ScalingDown", f"draining {excess} replica(s) to scale down to {n}"))

    # Rolling update: drain old replicas while enough stay Ready.
    ready = sum(p.ready for p in active)
    old = [p for p in active if p.spec_hash != h]
    for victim in victim_order(old, h, obs.loads):
        if victim.ready and ready - 1 < n - unavailable:
            break
        plan.actions.append(StartDrain(victim.name, ROLLOUT, victim.ip))
        plan.events.append(Event("Normal", "ReplacingReplica", f"draining pod {victim.name} (spec "
                                 f"{victim.spec_hash} -> {h}) for a rolling update"))
        active.remove(victim)
        held.append(victim)
        ready -= victim.ready

    # Create the missing replicas on the current spec, within replicas + maxSurge.
    current = [p for p in active if p.spec_hash == h]
    count = max(0, min(n - len(current), n + surge - len(active) - len(held)))
    if count:
        reason = "rollout" if has_old or held else "scale-up"
        for rank in lowest_free_ranks(obs.pods, count):
            plan.actions.append(CreatePod(rank, reason))
        if reason == "scale-up":
            plan.events.append(Event("Normal", "ScalingUp", f"creating {count} replica(s) to reach {n}"))
    return active, count, len(current) + count


def _condition(kind: ConditionType, ok: bool, reason: str, message: str = "") -> Condition:
    # the 1.20 apiserver rejects "" for a string field in a CRD status as null: no message is None, not ""
    return Condition(type=kind, status="True" if ok else "False", reason=reason, message=message or None)


def _previous_conditions(previous: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}


def _stamp(conditions: list[Condition], previous: Mapping[str, Any], now: float, generation: int) -> list[Condition]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = _previous_conditions(previous)
    for cond in conditions:
        old = before.get(cond.type)
        same = old is not None and old.get("status") == cond.status and old.get("lastTransitionTime")
        cond.last_transition_time = old["lastTransitionTime"] if same else format_time(now)
        cond.observed_generation = generation
    return conditions


def _transition_events(conditions: list[Condition], previous: Mapping[str, Any]) -> list[Event]:
    before = _previous_conditions(previous)
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


def _replica_statuses(pods: Sequence[PodView]) -> list[ReplicaStatus]:
    return [ReplicaStatus(rank=pod.rank, pod=pod.name, node=pod.node, devices=pod.devices, phase=pod.phase,
                          ready=pod.ready, draining=pod.draining, spec_hash=pod.spec_hash)
            for pod in sorted(pods, key=lambda p: p.rank) if not pod.deleting]


def _invalid(obs: Observed) -> Plan:
    message = summary(list(obs.problems))
    conditions = [_condition("SpecValid", False, "InvalidSpec", message),
                  _condition("Ready", False, "InvalidSpec", "the spec is invalid"),
                  _condition("Progressing", False, "InvalidSpec", "the spec is invalid")]
    previous = obs.previous_status
    status = PyptoServingStatus(observed_generation=obs.generation, phase="Invalid",
                                conditions=_stamp(conditions, previous, obs.now, obs.generation),
                                replica_statuses=_replica_statuses(obs.pods))
    return Plan(status=status, events=_transition_events(conditions, previous))


def plan(obs: Observed) -> Plan:
    """The whole reconcile decision for one PyptoServing."""
    spec = obs.spec
    if spec is None:
        return _invalid(obs)
    out = Plan()
    n, h = spec.replicas, d.spec_hash(spec)
    active, created, updated = _plan_pods(obs, spec, out)
    ready = sum(p.ready for p in active)
    draining = [p for p in obs.pods if p.draining and not p.deleting]
    old = [p for p in active if p.spec_hash != h]
    troubled = [p for p in obs.pods if p.problem and not p.deleting]
    converged = (len(active) == n and ready == n and not old and not draining and not created
                 and not any(isinstance(a, DeletePod | StartDrain) for a in out.actions))
    min_available = max(0, n - spec.rollout.max_unavailable)

    if troubled:
        phase = "Degraded"
    elif converged:
        phase = "Ready"
    elif n > 0 and ready == 0:
        phase = "Pending"
    else:
        phase = "Progressing"
    if old or any(p.drain_reason == ROLLOUT for p in draining):
        progress = "RollingUpdate"
    elif len(active) + created < n or created:
        progress = "ScalingUp"
    elif draining or any(isinstance(a, StartDrain) for a in out.actions):
        progress = "ScalingDown"
    else:
        progress = "WaitingForReady"
    degraded = (_condition("Degraded", True, troubled[0].problem or "Unhealthy",
                           "; ".join(f"pod {p.name}: {p.problem_message or p.problem}" for p in troubled))
                if troubled else _condition("Degraded", False, "AsExpected"))
    conditions = [
        _condition("SpecValid", True, "Valid"),
        _condition("Ready", converged, "AllReplicasReady" if converged else "ReplicasNotReady",
                   f"{ready}/{n} replicas ready"),
        _condition("Available", ready >= min_available and (n == 0 or ready > 0),
                   "MinimumReplicasAvailable" if ready >= min_available else "MinimumReplicasUnavailable",
                   f"{ready} ready, at least {min_available} required"),
        _condition("Progressing", not converged, "Converged" if converged else progress),
        degraded,
    ]
    previous = obs.previous_status
    owner = d.Owner(obs.name, obs.namespace, "")
    out.status = PyptoServingStatus(
        observed_generation=obs.generation,
        replicas=len(active) + created,
        ready_replicas=ready,
        updated_replicas=updated,
        devices_per_replica=spec.devices_per_replica,
        device_resource_name=spec.devices.resource_name,
        selector=d.selector_string(d.engine_selector(obs.name)),
        spec_hash=h,
        phase=phase,
        conditions=_stamp(conditions, previous, obs.now, obs.generation),
        replica_statuses=_replica_statuses(obs.pods),
        gateway=(GatewayStatus(service=d.gateway_name(obs.name), url=d.gateway_url(owner))
                 if spec.gateway.enabled else None),
    )
    out.events += _transition_events(conditions, previous)
    if draining or any(isinstance(a, StartDrain) for a in out.actions):
        out.requeue_after = REQUEUE_DRAINING
    elif not converged:
        out.requeue_after = REQUEUE_PROGRESSING
    return out
