"""Operator restarts, two operator replicas, rolling updates and unschedulable replicas on the real cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.operator.clusterkit import (
    OperatorProcess,
    condition,
    engine_pods,
    events,
    get_resource,
    kubectl_apply,
    pod_ready,
    resource,
    wait_ready,
)
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster


def names_and_uids(kube: Any, namespace: str, name: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in engine_pods(kube, namespace, name)}


def test_operator_killed_mid_scale_converges_without_duplicates(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any]) -> None:
    first = start_operator()
    kubectl_apply(cluster, namespace, resource("heal", model_volume, replicas=1))
    wait_ready(kube, namespace, "heal", 1)
    before = names_and_uids(kube, namespace, "heal")

    cluster.kubectl("scale", "pps", "heal", "-n", namespace, "--replicas=3")
    wait_for(lambda: len(engine_pods(kube, namespace, "heal")) > 1, 30, "the scale-up to start")
    first.kill()  # SIGKILL mid-scale: no cleanup, the lease is not released
    at_kill = names_and_uids(kube, namespace, "heal")
    cluster.kubectl("scale", "pps", "heal", "-n", namespace, "--replicas=4")  # changed while no operator runs

    second = start_operator()
    ready = wait_ready(kube, namespace, "heal", 4, timeout=300)
    after = names_and_uids(kube, namespace, "heal")
    assert sorted(after) == ["heal-dp-0", "heal-dp-1", "heal-dp-2", "heal-dp-3"]
    assert after["heal-dp-0"] == before["heal-dp-0"]  # the running replica was never replaced
    for pod, uid in at_kill.items():  # nothing the first operator created was deleted or created again
        assert after[pod] == uid, pod
    assert [r["rank"] for r in ready["status"]["replicaStatuses"]] == [0, 1, 2, 3]
    created = [e["message"] for e in events(kube, namespace, "heal") if e["reason"] == "CreatedReplica"]
    for pod in after:  # at most one successful create per pod name, across both operator processes
        assert sum(f"created pod {pod} " in m for m in created) <= 1, created
    assert all(e["reason"] != "DeletedReplica" for e in events(kube, namespace, "heal"))
    assert second.metric("pypto_operator_leader") == 1


def test_two_operator_replicas_one_leads_the_other_takes_over(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any]) -> None:
    a = start_operator()
    b = start_operator()
    wait_for(lambda: a.metric("pypto_operator_leader") + b.metric("pypto_operator_leader") == 1, 20,
             "exactly one leader")
    leader, standby = (a, b) if a.metric("pypto_operator_leader") == 1 else (b, a)
    kubectl_apply(cluster, namespace, resource("ha", model_volume, replicas=0))
    wait_for(lambda: (get_resource(kube, namespace, "ha").get("status") or {}).get("phase") == "Ready", 30,
             "the leader to reconcile")
    # the reconcile writes the status before it counts itself: wait for the count, then the standby has none
    wait_for(lambda: leader.metric("pypto_operator_reconciles_total", '{result="success"}') > 0, 30,
             "the leader to count its reconcile")
    assert standby.metric("pypto_operator_reconciles_total", '{result="success"}') == 0

    leader.kill()
    cluster.kubectl("scale", "pps", "ha", "-n", namespace, "--replicas=1")
    wait_for(lambda: standby.metric("pypto_operator_leader") == 1, 30, "the standby to take the lease over")
    wait_ready(kube, namespace, "ha", 1)
    assert [p["metadata"]["name"] for p in engine_pods(kube, namespace, "ha")] == ["ha-dp-0"]
    lease = cluster.kubectl("get", "lease", "op-lease", "-n", namespace, "-o",
                            "jsonpath={.spec.holderIdentity} {.spec.leaseTransitions}").stdout.split()
    assert int(lease[1]) >= 1
    # a clean shutdown releases the lease at once
    standby.stop()
    holder = cluster.kubectl("get", "lease", "op-lease", "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}")
    assert holder.stdout == ""


def test_device_request_larger_than_a_node_is_degraded_with_the_scheduler_reason(
        cluster: Any, namespace: str, kube: Any, operator: OperatorProcess, model_volume: dict[str, Any]) -> None:
    kubectl_apply(cluster, namespace, resource("big", model_volume, replicas=1, parallel={"tensorParallelSize": 16}))

    def degraded() -> dict[str, Any] | None:
        body = get_resource(kube, namespace, "big")
        return body if (body.get("status") or {}).get("phase") == "Degraded" else None

    body = wait_for(degraded, 60, "phase Degraded")
    cond = condition(body, "Degraded")  # type: ignore[arg-type]
    assert cond["status"] == "True" and cond["reason"] == "Unschedulable"
    assert "Insufficient huawei.com/Ascend910" in cond["message"] and "big-dp-0" in cond["message"]
    assert body["status"]["devicesPerReplica"] == 16  # type: ignore[index]
    warnings = [e for e in events(kube, namespace, "big") if e["type"] == "Warning"]
    assert any("Insufficient huawei.com/Ascend910" in e["message"] for e in warnings)
    # fixing the spec heals it: the replica is replaced by one that fits
    cluster.kubectl("patch", "pps", "big", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"parallel":{"tensorParallelSize":2}}}')  # the tiny model has 2 KV heads
    healed = wait_ready(kube, namespace, "big", 1)
    assert condition(healed, "Degraded")["status"] == "False"
    (pod,) = engine_pods(kube, namespace, "big", include_terminating=False)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["huawei.com/Ascend910"] == "2"


def test_rolling_update_keeps_replicas_minus_max_unavailable_ready(
        cluster: Any, namespace: str, kube: Any, operator: OperatorProcess, model_volume: dict[str, Any]) -> None:
    kubectl_apply(cluster, namespace, resource("roll", model_volume, replicas=3,
                                               rollout={"maxUnavailable": 1, "maxSurge": 0}))
    old = wait_ready(kube, namespace, "roll", 3)
    old_hash = old["status"]["specHash"]
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:  # serving replicas (Ready, not draining) and pods holding devices, every 100 ms
        while not stop.is_set():
            pods = engine_pods(kube, namespace, "roll")
            serving = sum(pod_ready(p) and p["metadata"]["labels"].get("serving.pypto.io/draining") != "true"
                          for p in pods)
            samples.append((serving, len(pods)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        cluster.kubectl("patch", "pps", "roll", "-n", namespace, "--type=merge",
                        "-p", '{"spec":{"engine":{"maxNumSeqs":4}}}')
        new = wait_ready(kube, namespace, "roll", 3, timeout=400)
    finally:
        stop.set()
        sampler.join(10)
    assert new["status"]["specHash"] != old_hash and new["status"]["updatedReplicas"] == 3
    pods = engine_pods(kube, namespace, "roll", include_terminating=False)
    assert sorted(p["metadata"]["name"] for p in pods) == ["roll-dp-0", "roll-dp-1", "roll-dp-2"]  # ranks reused
    assert all(p["metadata"]["labels"]["serving.pypto.io/spec-hash"] == new["status"]["specHash"] for p in pods)
    assert "--max-num-seqs" in pods[0]["spec"]["containers"][0]["args"]
    assert min(s for s, _ in samples) >= 2, samples  # replicas - maxUnavailable
    assert max(t for _, t in samples) <= 3, samples  # replicas + maxSurge
    reasons = [e["reason"] for e in events(kube, namespace, "roll")]
    assert reasons.count("ReplacingReplica") == 3


def test_crash_looping_replica_is_degraded_with_the_reason(
        cluster: Any, namespace: str, kube: Any, operator: OperatorProcess, model_volume: dict[str, Any]) -> None:
    broken = {**model_volume, "path": "/models/tiny/no-such-model"}  # the engine exits: no config.json there
    kubectl_apply(cluster, namespace, resource("crash", broken, replicas=1))

    def degraded() -> dict[str, Any] | None:
        body = get_resource(kube, namespace, "crash")
        return body if condition(body, "Degraded").get("reason") == "CrashLoopBackOff" else None

    body = wait_for(degraded, 120, "Degraded=True with reason CrashLoopBackOff")
    cond = condition(body, "Degraded")  # type: ignore[arg-type]
    assert cond["status"] == "True" and "crash-dp-0" in cond["message"]
    assert body["status"]["phase"] == "Degraded" and body["status"]["readyReplicas"] == 0  # type: ignore[index]
    assert any(e["type"] == "Warning" and e["reason"] == "CrashLoopBackOff" for e in events(kube, namespace, "crash"))
