"""Pure planning: scale up/down, drain victims and deadlines, self-healing, rolling updates, status."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pypto_serving import contract
from pypto_serving.contract import LoadReport
from pypto_serving.operator import desired as d
from pypto_serving.operator import plan as p
from pypto_serving.operator.defaults import resolve
from pypto_serving.operator.state import PodView, pod_view
from pypto_serving.operator.types import PyptoServingSpec
from pypto_serving.operator.validation import validate
from tests.operator.corpus import minimal

NOW = 1_700_000_000.0


def spec_of(**overrides: Any) -> PyptoServingSpec:
    """The spec of ``minimal(**overrides)`` resolved with the operator's built-in defaults, as validate() gives it."""
    return resolve(PyptoServingSpec.model_validate(minimal(**overrides)["spec"]))


def pod(rank: int, spec: PyptoServingSpec | None = None, *, ready: bool = True, **kw: Any) -> PodView:
    fields: dict[str, Any] = {"name": f"demo-dp-{rank}", "rank": rank, "phase": "Running", "ready": ready,
                              "ip": f"127.0.1.{rank + 1}", "spec_hash": d.spec_hash(spec or spec_of())}
    fields.update(kw)
    return PodView(**fields)


def observe(spec: PyptoServingSpec | None, pods: list[PodView], loads: dict[str, LoadReport] | None = None,
            now: float = NOW, previous: dict[str, Any] | None = None, problems: list[Any] | None = None) -> p.Observed:
    return p.Observed(name="demo", namespace="ns", generation=3, spec=spec, problems=problems or [], pods=pods,
                      loads=loads or {}, now=now, previous_status=previous or {})


def kinds(plan: p.Plan, kind: type) -> list[Any]:
    return [a for a in plan.actions if isinstance(a, kind)]


def cond(plan: p.Plan, kind: str) -> dict[str, Any]:
    return next(c.to_kube() for c in plan.status.conditions if c.type == kind)


def test_create_from_scratch() -> None:
    spec = spec_of(replicas=3)
    out = p.plan(observe(spec, []))
    assert out.actions == [p.CreatePod(0, "scale-up"), p.CreatePod(1, "scale-up"), p.CreatePod(2, "scale-up")]
    assert out.status.replicas == 3 and out.status.ready_replicas == 0
    assert out.status.phase == "Pending" and cond(out, "Progressing")["reason"] == "ScalingUp"
    assert out.status.selector == "app.kubernetes.io/instance=demo,app.kubernetes.io/component=engine"
    assert out.status.observed_generation == 3 and out.status.devices_per_replica == 1
    assert out.requeue_after == p.REQUEUE_PROGRESSING
    assert [(e.type, e.reason) for e in out.events] == [("Normal", "ScalingUp")]


def test_converged_is_idle_and_ready() -> None:
    spec = spec_of(replicas=2)
    out = p.plan(observe(spec, [pod(0), pod(1)]))
    assert out.actions == [] and out.requeue_after is None
    assert out.status.phase == "Ready" and cond(out, "Ready")["status"] == "True"
    assert cond(out, "Available")["status"] == "True" and cond(out, "Degraded")["status"] == "False"
    assert cond(out, "Progressing") == {**cond(out, "Progressing"), "status": "False", "reason": "Converged"}
    assert [r.rank for r in out.status.replica_statuses] == [0, 1]
    assert [e.reason for e in out.events] == ["Ready"]
    # the same observation again with the status it produced: no new events, same transition times
    again = p.plan(observe(spec, [pod(0), pod(1)], now=NOW + 60, previous=out.status.to_kube()))
    assert again.events == [] and again.status.conditions == out.status.conditions


def test_scale_up_fills_lowest_free_ranks() -> None:
    out = p.plan(observe(spec_of(replicas=4), [pod(0), pod(2)]))
    assert out.actions == [p.CreatePod(1, "scale-up"), p.CreatePod(3, "scale-up")]


def test_scale_down_drains_least_loaded_then_highest_rank() -> None:
    pods = [pod(0), pod(1), pod(2), pod(3)]
    loads = {"demo-dp-0": LoadReport(running=0), "demo-dp-1": LoadReport(running=3), "demo-dp-2": LoadReport(waiting=1),
             "demo-dp-3": LoadReport(running=0)}
    out = p.plan(observe(spec_of(replicas=2), pods, loads))
    assert kinds(out, p.StartDrain) == [p.StartDrain("demo-dp-3", "scale-down", "127.0.1.4"),
                                         p.StartDrain("demo-dp-0", "scale-down", "127.0.1.1")]
    assert kinds(out, p.CreatePod) == [] and out.requeue_after == p.REQUEUE_DRAINING
    assert out.status.replicas == 2 and cond(out, "Progressing")["reason"] == "ScalingDown"


def test_scale_down_prefers_not_ready_and_never_guesses_unknown_load_is_idle() -> None:
    pods = [pod(0), pod(1, ready=False), pod(2)]
    loads = {"demo-dp-0": LoadReport(running=1)}  # dp-2's load is unknown: assume busy
    out = p.plan(observe(spec_of(replicas=1), pods, loads))
    assert [a.pod for a in kinds(out, p.StartDrain)] == ["demo-dp-1", "demo-dp-0"]


def test_draining_replica_waits_then_is_deleted() -> None:
    spec = spec_of(replicas=1, drain={"timeoutSeconds": 30})
    draining = pod(1, draining=True, drain_started=NOW - 10, drain_reason="scale-down")
    busy = {"demo-dp-1": LoadReport(running=1, draining=True)}
    out = p.plan(observe(spec, [pod(0), draining], busy))
    assert out.actions == [] and out.requeue_after == p.REQUEUE_DRAINING
    assert out.status.phase != "Ready"
    idle = {"demo-dp-1": LoadReport(running=0, waiting=0, draining=True)}
    assert p.plan(observe(spec, [pod(0), draining], idle)).actions == [p.DeletePod("demo-dp-1", "drained")]
    late = p.plan(observe(spec, [pod(0), draining], busy, now=NOW + 25))
    assert late.actions == [p.DeletePod("demo-dp-1", "drain-timeout")]
    assert [e.reason for e in late.events if e.type == "Warning"] == ["DrainTimeout"]


def test_drain_is_reposted_after_an_operator_restart() -> None:
    spec = spec_of(replicas=1)
    draining = pod(1, draining=True, drain_started=NOW - 1, drain_reason="scale-down")
    out = p.plan(observe(spec, [pod(0), draining], {"demo-dp-1": LoadReport(running=2, draining=False)}))
    assert out.actions == [p.StartDrain("demo-dp-1", "scale-down", "127.0.1.2", restamp=False)]
    unstamped = dataclasses.replace(draining, drain_started=None)
    out = p.plan(observe(spec, [pod(0), unstamped], {"demo-dp-1": LoadReport(running=2, draining=True)}))
    assert out.actions == [p.StartDrain("demo-dp-1", "scale-down", "127.0.1.2", restamp=True)]


def test_draining_pod_that_is_not_serving_is_deleted_at_once() -> None:
    pending = pod(1, ready=False, phase="Pending", ip=None, draining=True, drain_started=NOW)
    assert p.plan(observe(spec_of(replicas=1), [pod(0), pending])).actions == [
        p.DeletePod("demo-dp-1", "not-serving")]


def test_failed_and_deleted_pods_are_replaced() -> None:
    spec = spec_of(replicas=3)
    evicted = pod(1, ready=False, phase="Failed", problem="Evicted", problem_message="low memory")
    out = p.plan(observe(spec, [pod(0), evicted, pod(2)]))
    assert out.actions == [p.DeletePod("demo-dp-1", "failed"), p.CreatePod(3, "scale-up")]
    assert any(e.type == "Warning" and e.reason == "ReplicaFailed" for e in out.events)
    terminating = pod(1, ready=False, deleting=True)
    assert p.plan(observe(spec, [pod(0), terminating, pod(2)])).actions == [p.CreatePod(3, "scale-up")]
    gone = p.plan(observe(spec, [pod(0), pod(2)]))
    assert gone.actions == [p.CreatePod(1, "scale-up")]


def test_unschedulable_sets_degraded_with_the_scheduler_reason() -> None:
    spec = spec_of(replicas=1, parallel={"tensorParallelSize": 16})
    message = "0/2 nodes are available: 2 Insufficient huawei.com/Ascend910."
    stuck = pod(0, spec, ready=False, phase="Pending", ip=None, problem="Unschedulable", problem_message=message)
    out = p.plan(observe(spec, [stuck]))
    assert out.actions == [] and out.status.phase == "Degraded"
    degraded = cond(out, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Unschedulable"
    assert "Insufficient huawei.com/Ascend910" in degraded["message"] and "demo-dp-0" in degraded["message"]
    assert any(e.type == "Warning" and "Insufficient" in e.message for e in out.events)
    assert out.status.devices_per_replica == 16


def test_invalid_spec_makes_no_pods() -> None:
    body = minimal(parallel={"tensorParallelSize": 3}, devices={"perNode": 2})  # 3 devices do not split into pods
    spec, problems = validate(body)
    out = p.plan(observe(spec, [], problems=problems))
    assert out.actions == [] and out.status.phase == "Invalid"
    valid = cond(out, "SpecValid")
    assert valid["status"] == "False" and "tensorParallelSize" in valid["message"]
    assert [e.reason for e in out.events] == ["InvalidSpec"]
    again = p.plan(observe(spec, [], problems=problems, previous=out.status.to_kube()))
    assert again.events == []


def test_rollout_with_no_surge_replaces_one_at_a_time_reusing_ranks() -> None:
    old_spec, new = spec_of(replicas=3), spec_of(replicas=3, engine={"maxModelLen": 64})
    old = [pod(0, old_spec), pod(1, old_spec), pod(2, old_spec)]
    out = p.plan(observe(new, old))
    assert out.actions == [p.StartDrain("demo-dp-2", "rollout", "127.0.1.3")]
    assert cond(out, "Progressing")["reason"] == "RollingUpdate" and out.status.updated_replicas == 0
    held = [old[0], old[1], dataclasses.replace(old[2], draining=True, drain_started=NOW, drain_reason="rollout")]
    assert p.plan(observe(new, held, {"demo-dp-2": LoadReport(running=1, draining=True)})).actions == []
    assert p.plan(observe(new, old[:2])).actions == [p.CreatePod(2, "rollout")]
    fresh = pod(2, new, ready=False)
    assert p.plan(observe(new, [*old[:2], fresh])).actions == []  # next one only after the new one is Ready


def simulate(old_spec: PyptoServingSpec, new_spec: PyptoServingSpec, steps: int = 60) -> list[tuple[int, int]]:
    """Run the planner against a toy cluster; return (ready, total pods) after each step's actions."""
    pods = {r: pod(r, old_spec) for r in range(old_spec.replicas)}
    trace = []
    for step in range(steps):
        idle = {n.name: LoadReport() for n in pods.values()}
        out = p.plan(observe(new_spec, list(pods.values()), idle, now=NOW + step))
        for action in out.actions:
            if isinstance(action, p.CreatePod):
                assert action.rank not in pods
                pods[action.rank] = pod(action.rank, new_spec, ready=False)
            elif isinstance(action, p.StartDrain):
                victim = next(v for v in pods.values() if v.name == action.pod)
                pods[victim.rank] = dataclasses.replace(victim, draining=True, drain_started=NOW + step,
                                                        drain_reason=action.reason, ready=victim.ready)
            else:
                del pods[next(v.rank for v in pods.values() if v.name == action.pod)]
        trace.append((sum(v.ready and not v.draining for v in pods.values()), len(pods)))
        if not out.actions and out.status.phase == "Ready":
            return trace
        pods = {r: dataclasses.replace(v, ready=True) for r, v in pods.items()}  # new replicas become Ready
    raise AssertionError(f"rollout did not converge: {trace}")


@pytest.mark.parametrize(("surge", "unavailable"), [(0, 1), (1, 0), (1, 1), (0, 2), (2, 0)])
def test_rollout_respects_max_unavailable_and_max_surge(surge: int, unavailable: int) -> None:
    n = 4
    rollout = {"maxSurge": surge, "maxUnavailable": unavailable}
    old_spec = spec_of(replicas=n, rollout=rollout)
    new_spec = spec_of(replicas=n, rollout=rollout, engine={"maxModelLen": 99})
    trace = simulate(old_spec, new_spec)
    assert all(ready >= n - unavailable for ready, _ in trace), trace
    assert all(total <= n + surge for _, total in trace), trace
    assert trace[-1] == (n, n)


def test_loads_needed_only_when_a_choice_or_drain_is_pending() -> None:
    spec = spec_of(replicas=2)
    steady = [pod(0), pod(1)]
    assert p.loads_needed(spec, steady) == []
    draining = pod(2, draining=True, drain_started=NOW)
    assert [v.name for v in p.loads_needed(spec, [*steady, draining])] == ["demo-dp-2"]
    assert [v.name for v in p.loads_needed(spec_of(replicas=1), steady)] == ["demo-dp-0", "demo-dp-1"]
    assert p.loads_needed(None, steady) == []


def raw_pod(**status: Any) -> dict[str, Any]:
    labels = {contract.L_RANK: "4", contract.L_HASH: "abc", contract.L_DRAINING: "true"}
    annotations = {contract.A_DRAIN_STARTED: "2024-01-01T00:00:10Z", contract.A_DRAIN_REASON: "rollout",
                   contract.A_REAL_DEVICES: "0,1"}
    return {"metadata": {"name": "demo-dp-4", "labels": labels, "annotations": annotations},
            "spec": {"nodeName": "node-1"}, "status": status}


def test_pod_view_parses_labels_annotations_and_problems() -> None:
    view = pod_view(raw_pod(phase="Running", podIP="127.0.2.3",
                            conditions=[{"type": "Ready", "status": "True"}]))
    assert view is not None
    assert (view.rank, view.spec_hash, view.ready, view.draining, view.drain_reason) == (4, "abc", True, True,
                                                                                         "rollout")
    assert view.drain_started == 1704067210.0 and view.devices == "0,1" and view.node == "node-1"
    assert view.problem is None and not view.active
    unsched = pod_view(raw_pod(phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 Insufficient huawei.com/Ascend910."}]))
    assert unsched is not None and unsched.problem == "Unschedulable" and "Insufficient" in unsched.problem_message
    crash = pod_view(raw_pod(phase="Running", containerStatuses=[
        {"name": "engine", "ready": False, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]))
    assert crash is not None and crash.problem == "CrashLoopBackOff"
    evicted = pod_view(raw_pod(phase="Failed", reason="Evicted", message="The node was low on memory."))
    assert evicted is not None and evicted.failed and evicted.problem == "Evicted"
    assert pod_view({"metadata": {"name": "x", "labels": {}}}) is None
