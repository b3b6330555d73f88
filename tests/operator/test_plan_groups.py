"""Pure planning of multi-pod serving groups: create, complete, heal whole, start timeout, scale, drain, roll."""

from __future__ import annotations

from typing import Any

from pypto_serving import contract as c
from pypto_serving.contract import LoadReport
from pypto_serving.operator import desired as d
from pypto_serving.operator import plan as p
from pypto_serving.operator.state import PodView, format_time
from tests.operator.test_plan import NOW, cond, kinds, observe, spec_of

TP4 = {"parallel": {"tensorParallelSize": 4}, "devices": {"perNode": 2}}


def group(index: int, spec: Any = None, *, size: int = 2, ready: bool = True, complete: bool = True,
          skip: tuple[int, ...] = (), all_serve: bool = False, **kw: Any) -> list[PodView]:
    """The pods of group ``index`` as the planner sees them (leader first)."""
    h = d.spec_hash(spec or spec_of(**TP4))
    out = []
    for i in range(size):
        if i in skip:
            continue
        serves = all_serve or i == 0
        fields: dict[str, Any] = {
            "name": f"demo-dp-{index}-{i}", "rank": index, "phase": "Running", "ready": ready,
            "ip": f"127.0.{index + 1}.{i + 1}", "spec_hash": h, "group_pod": i, "group_size": size, "serves": serves,
            "group_complete": complete and i == 0, "group_ready": ("true" if ready else "false") if serves else None,
            "created": NOW - 30, "node": f"node-{i}"}
        fields.update(kw)
        out.append(PodView(**fields))
    return out


def with_(pods: list[PodView], name: str, **kw: Any) -> list[PodView]:
    """``pods`` with the fields of pod ``name`` replaced."""
    return [PodView(**{**vars(pod), **kw}) if pod.name == name else pod for pod in pods]


def test_a_group_is_created_leader_first_then_its_workers_with_the_leaders_ip() -> None:
    spec = spec_of(replicas=2, **TP4)
    out = p.plan(observe(spec, []))
    assert out.actions == [p.CreatePod(0, "scale-up"), p.CreatePod(1, "scale-up")]
    assert out.status.replicas == 2 and out.status.pods_per_group == 2 and out.status.devices_per_pod == 2
    # the leaders exist, one has an IP: its worker is created with that IP, then the leader is marked complete
    leaders = group(0, complete=False, ready=False, skip=(1,)) + group(1, complete=False, ready=False, skip=(1,),
                                                                       ip=None)
    out = p.plan(observe(spec, leaders))
    assert out.actions == [p.CreatePod(0, "group", index=1, leader_ip="127.0.1.1"),
                           p.LabelPod("demo-dp-0-0", c.A_GROUP_COMPLETE, "true", annotation=True)]
    assert out.status.replicas == 2 and out.status.ready_replicas == 0 and out.status.phase == "Pending"
    # planning the same observation again (a restarted operator) decides the same: no duplicate group
    assert p.plan(observe(spec, leaders)).actions == out.actions


def test_a_group_is_ready_only_when_every_pod_is_and_then_its_serving_pod_is_labelled() -> None:
    spec = spec_of(replicas=1, **TP4)
    pods = with_(group(0, ready=False), "demo-dp-0-0", ready=True)
    out = p.plan(observe(spec, pods))
    assert out.actions == [] and out.status.ready_replicas == 0 and not out.status.groups[0].ready
    pods = group(0, ready=True)
    pods = with_(pods, "demo-dp-0-0", group_ready="false")
    out = p.plan(observe(spec, pods))
    assert out.actions == [p.LabelPod("demo-dp-0-0", c.L_GROUP_READY, "true")]
    out = p.plan(observe(spec, group(0)))
    assert out.actions == [] and out.status.phase == "Ready" and cond(out, "Ready")["status"] == "True"
    assert out.status.replicas == 1 and out.status.ready_replicas == 1 and out.status.updated_replicas == 1
    (status,) = out.status.to_kube()["groups"]
    assert status["group"] == 0 and status["ready"] and status["serving"] == ["demo-dp-0-0"]
    assert [(x["pod"], x["role"], x["groupPod"], x["node"]) for x in status["pods"]] == [
        ("demo-dp-0-0", "leader", 0, "node-0"), ("demo-dp-0-1", "worker", 1, "node-1")]
    # a pod of a Ready group that stops being Ready: the serving pod's label says so at once
    out = p.plan(observe(spec, with_(group(0), "demo-dp-0-1", ready=False)))
    assert out.actions == [p.LabelPod("demo-dp-0-0", c.L_GROUP_READY, "false")]


def test_a_failed_deleted_or_missing_pod_deletes_the_whole_group_and_only_it() -> None:
    spec = spec_of(replicas=2, **TP4)
    healthy = group(1)
    cases = {
        "failed": with_(group(0), "demo-dp-0-1", phase="Failed", problem="Error", problem_message="exit 1"),
        "deleted": with_(group(0), "demo-dp-0-1", deleting=True, ready=False),
        "missing": group(0, skip=(1,)),
    }
    for why, pods in cases.items():
        out = p.plan(observe(spec, pods + healthy))
        deleted = [a.pod for a in kinds(out, p.DeletePod)]
        assert set(deleted) == {x.name for x in pods if not x.deleting}, why
        assert all(a.reason == "group-failed" for a in kinds(out, p.DeletePod)), why
        assert kinds(out, p.CreatePod) == [p.CreatePod(2, "scale-up")], why  # index 0 is still taken
        assert [e.reason for e in out.events][:1] == ["GroupFailed"], why
        assert not any(getattr(a, "pod", "").startswith("demo-dp-1") for a in out.actions), why
    # the leader gone: its workers go too
    out = p.plan(observe(spec, group(0, skip=(0,)) + healthy))
    assert kinds(out, p.DeletePod) == [p.DeletePod("demo-dp-0-1", "group-failed")]
    # a group whose pods are all terminating holds its index until they are gone
    out = p.plan(observe(spec, group(0, deleting=True, ready=False) + healthy))
    assert out.actions == [p.CreatePod(2, "scale-up")] and out.status.replicas == 2


def test_a_half_created_group_of_an_old_spec_is_deleted_not_completed() -> None:
    spec = spec_of(replicas=1, **TP4)
    old = group(0, spec=spec_of(replicas=1, engine={"maxNumSeqs": 4}, **TP4), complete=False, skip=(1,))
    out = p.plan(observe(spec, old))
    assert kinds(out, p.DeletePod) == [p.DeletePod("demo-dp-0-0", "incomplete")]


def test_a_group_not_scheduled_in_time_releases_its_pods_and_creation_backs_off() -> None:
    spec = spec_of(replicas=1, groupStartTimeoutSeconds=60, **TP4)
    unschedulable = "0/3 nodes are available: 3 Insufficient huawei.com/Ascend910."
    pods = with_(group(0, ready=False, created=NOW - 30), "demo-dp-0-1", phase="Pending", node=None, ip=None,
                 problem="Unschedulable", problem_message=unschedulable)
    early = p.plan(observe(spec, pods))
    assert early.actions == [] and cond(early, "Degraded")["reason"] == "Unschedulable"
    assert unschedulable in cond(early, "Degraded")["message"]
    late = p.plan(observe(spec, [PodView(**{**vars(x), "created": NOW - 61}) for x in pods]))
    assert late.actions == [p.DeletePod("demo-dp-0-0", "start-timeout"), p.DeletePod("demo-dp-0-1", "start-timeout")]
    degraded = cond(late, "Degraded")
    assert degraded["reason"] == p.START_TIMEOUT and unschedulable in degraded["message"]
    assert "not fully scheduled within 60s" in degraded["message"] and late.status.phase == "Degraded"
    assert [e.reason for e in late.events][:1] == [p.START_TIMEOUT]
    status = late.status.to_kube()
    assert status["lastGroupStartFailure"]["group"] == 0
    # the pods are gone: nothing is created while backing off, and the condition keeps saying why
    waiting = p.plan(observe(spec, [], now=NOW + 30, previous=status))
    assert waiting.actions == [] and cond(waiting, "Degraded")["reason"] == p.START_TIMEOUT
    assert waiting.status.to_kube()["lastGroupStartFailure"] == status["lastGroupStartFailure"]
    retry = p.plan(observe(spec, [], now=NOW + 61, previous=status))
    assert retry.actions == [p.CreatePod(0, "scale-up")] and cond(retry, "Degraded")["status"] == "False"


def test_scale_down_drains_the_least_busy_group_through_its_serving_pods() -> None:
    spec = spec_of(replicas=1, **TP4)
    pods = group(0) + group(1)
    loads = {"demo-dp-0-0": LoadReport(running=3), "demo-dp-1-0": LoadReport(running=1)}
    assert {x.name for x in p.loads_needed(spec, pods)} == {"demo-dp-0-0", "demo-dp-1-0"}  # never a worker
    out = p.plan(observe(spec, pods, loads))
    assert out.actions == [p.StartDrain("demo-dp-1-0", "scale-down", "127.0.2.1")]
    assert out.status.replicas == 1
    draining = with_(pods, "demo-dp-1-0", draining=True, drain_started=NOW - 5, drain_reason="scale-down")
    busy = {"demo-dp-1-0": LoadReport(running=1, draining=True)}
    out = p.plan(observe(spec, draining, busy))
    assert out.actions == []  # the draining label already keeps the gateway away
    assert out.requeue_after == p.REQUEUE_DRAINING and out.status.groups[1].draining
    idle = {"demo-dp-1-0": LoadReport(draining=True)}
    out = p.plan(observe(spec, draining, idle))
    assert kinds(out, p.DeletePod) == [p.DeletePod("demo-dp-1-0", "drained"), p.DeletePod("demo-dp-1-1", "drained")]
    late = p.plan(observe(spec, draining, busy, now=NOW + spec.drain.timeout_seconds))
    assert [a.reason for a in kinds(late, p.DeletePod)] == ["drain-timeout"] * 2


def test_a_dp_ep_group_drains_every_rank_even_after_a_restart_half_way() -> None:
    spec = spec_of(replicas=0, **TP4)
    pods = group(0, all_serve=True)
    out = p.plan(observe(spec, pods, {"demo-dp-0-0": LoadReport(), "demo-dp-0-1": LoadReport()}))
    assert kinds(out, p.StartDrain) == [p.StartDrain("demo-dp-0-0", "scale-down", "127.0.1.1"),
                                        p.StartDrain("demo-dp-0-1", "scale-down", "127.0.1.2")]
    # the operator stopped after labelling rank 0: rank 1 is drained too, and the group waits for both
    half = with_(pods, "demo-dp-0-0", draining=True, drain_started=NOW - 1, drain_reason="scale-down")
    out = p.plan(observe(spec, half, {"demo-dp-0-0": LoadReport(draining=True)}))
    assert p.StartDrain("demo-dp-0-1", "scale-down", "127.0.1.2") in out.actions
    assert not kinds(out, p.DeletePod)


def test_rolling_update_replaces_group_by_group() -> None:
    old_spec = spec_of(replicas=2, **TP4)
    new = spec_of(replicas=2, engine={"maxNumSeqs": 4}, **TP4)
    pods = group(0, old_spec) + group(1, old_spec)
    out = p.plan(observe(new, pods, {"demo-dp-0-0": LoadReport(), "demo-dp-1-0": LoadReport()}))
    assert out.actions == [p.StartDrain("demo-dp-1-0", "rollout", "127.0.2.1")]
    assert cond(out, "Progressing")["reason"] == "RollingUpdate"
    # the drained group is gone: its index is reused by a group on the new spec
    out = p.plan(observe(new, group(0, old_spec)))
    assert out.actions == [p.CreatePod(1, "rollout")]


def test_a_change_of_group_size_judges_old_groups_by_their_own_size() -> None:
    """perNode 2 -> 4: old two-pod groups are drained like any old replica, not torn down as broken."""
    old_spec = spec_of(replicas=1, **TP4)
    new = spec_of(replicas=1, parallel={"tensorParallelSize": 4}, devices={"perNode": 4})
    out = p.plan(observe(new, group(0, old_spec), {"demo-dp-0-0": LoadReport()}))
    assert out.actions == [p.StartDrain("demo-dp-0-0", "rollout", "127.0.1.1")]


def test_status_of_a_plain_replica_has_one_pod_groups() -> None:
    spec = spec_of(replicas=1)
    pod = PodView(name="demo-dp-0", rank=0, phase="Running", ready=True, ip="127.0.0.1", spec_hash=d.spec_hash(spec))
    status = p.plan(observe(spec, [pod])).status.to_kube()
    assert status["podsPerGroup"] == 1 and status["groups"] == [
        {"group": 0, "ready": True, "draining": False, "specHash": d.spec_hash(spec), "serving": ["demo-dp-0"],
         "pods": [{"rank": 0, "pod": "demo-dp-0", "phase": "Running", "ready": True, "draining": False,
                   "specHash": d.spec_hash(spec)}]}]
    assert format_time(NOW)  # the helpers the planner stamps times with stay importable
