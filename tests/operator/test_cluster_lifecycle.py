"""On the real local cluster with real engines: create, scale (kubectl scale and spec edits), self-healing,
garbage collection, status, events and metrics."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from pypto_serving.operator.types import API_VERSION, KIND
from tests.operator.clusterkit import (
    OperatorProcess,
    condition,
    engine_pods,
    events,
    kubectl_apply,
    resource,
    wait_ready,
)
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_create_scale_heal_and_garbage_collect(cluster: Any, namespace: str, kube: Any, operator: OperatorProcess,
                                               model_volume: dict[str, Any]) -> None:
    body = resource("demo", model_volume, replicas=2, parallel={"tensorParallelSize": 2},
                    gateway={"enabled": True, "routing": "least-requests"})
    kubectl_apply(cluster, namespace, body)

    # -- create: one pod per rank, with the contract's labels, devices, env, probes and owner
    ready = wait_ready(kube, namespace, "demo", 2)
    uid = ready["metadata"]["uid"]
    pods = engine_pods(kube, namespace, "demo")
    assert [p["metadata"]["name"] for p in pods] == ["demo-dp-0", "demo-dp-1"]
    for rank, pod in enumerate(pods):
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "pypto-serving"
        assert labels["app.kubernetes.io/instance"] == "demo" and labels["app.kubernetes.io/component"] == "engine"
        assert labels["serving.pypto.io/dp-rank"] == str(rank)
        assert labels["serving.pypto.io/spec-hash"] == ready["status"]["specHash"]
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"]["huawei.com/Ascend910"] == "2"
        assert container["resources"]["requests"]["huawei.com/Ascend910"] == "2"
        env = env_of(pod)
        assert env["PYPTO_TP_SIZE"] == "2" and "PYPTO_DP_RANK" not in env
        assert env["HCCL_IF_IP"] == "$(POD_IP)"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == uid
        assert pod["metadata"]["annotations"].get("huawei.com/AscendReal")  # devices allocated by the node
        models = httpx.get(f"http://{pod['status']['podIP']}:8000/v1/models", timeout=10, trust_env=False).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    status = ready["status"]
    assert status["devicesPerReplica"] == 2 and status["updatedReplicas"] == 2
    assert status["selector"] == "app.kubernetes.io/instance=demo,app.kubernetes.io/component=engine"
    assert [r["rank"] for r in status["replicaStatuses"]] == [0, 1]
    assert all(r["ready"] and r["devices"] for r in status["replicaStatuses"])
    assert len({r["node"] for r in status["replicaStatuses"]}) == 2  # spread by the preferred anti-affinity
    assert condition(ready, "SpecValid")["status"] == "True" and condition(ready, "Available")["status"] == "True"
    assert status["gateway"]["url"] == f"http://demo-gateway.{namespace}.svc:8080"
    for kind in ("deployment", "service", "serviceaccount", "role", "rolebinding"):
        got = cluster.kubectl("get", kind, "demo-gateway", "-n", namespace, "-o",
                              "jsonpath={.metadata.ownerReferences[0].uid}")
        assert got.stdout == uid, kind
    headless = cluster.kubectl("get", "service", "demo-engines", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}")
    assert headless.stdout == "None"
    table = cluster.kubectl("get", "pps", "demo", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "REPLICAS", "READY", "TP", "DEVICES/REPLICA", "PHASE", "AGE"]
    assert table.split("\n")[1].split()[:6] == ["demo", "2", "2", "2", "2", "Ready"]

    # -- kubectl scale up: the lowest free rank is created
    cluster.kubectl("scale", "pps", "demo", "-n", namespace, "--replicas=3")
    wait_ready(kube, namespace, "demo", 3)
    assert [p["metadata"]["name"] for p in engine_pods(kube, namespace, "demo")] == [
        "demo-dp-0", "demo-dp-1", "demo-dp-2"]
    # `kubectl get pps` follows: REPLICAS and READY 3, TP and DEVICES/REPLICA still 2, AGE the resource's age
    row = cluster.kubectl("get", "pps", "demo", "-n", namespace, "--no-headers").stdout.split()
    assert row[:6] == ["demo", "3", "3", "2", "2", "Ready"] and re.fullmatch(r"\d+(s|m\d*s?)", row[6]), row

    # -- editing spec.replicas down: two-phase drain of idle replicas (ties -> highest ranks), then deletion
    cluster.kubectl("patch", "pps", "demo", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":1}}')
    wait_ready(kube, namespace, "demo", 1)
    wait_for(lambda: [p["metadata"]["name"] for p in engine_pods(kube, namespace, "demo")] == ["demo-dp-0"], 90,
             "the drained replicas to be deleted")
    reasons = [e["reason"] for e in events(kube, namespace, "demo")]
    assert reasons.count("DrainingReplica") >= 2 and reasons.count("DeletedReplica") >= 2
    assert "CreatedReplica" in reasons and "Ready" in reasons

    # -- self-healing: a deleted pod is recreated (same rank: it is the lowest free one)
    old_uid = engine_pods(kube, namespace, "demo")[0]["metadata"]["uid"]
    cluster.kubectl("delete", "pod", "demo-dp-0", "-n", namespace, "--wait=false")
    wait_for(lambda: any(p["metadata"]["uid"] != old_uid and not p["metadata"].get("deletionTimestamp")
                         for p in engine_pods(kube, namespace, "demo")), 90, "a replacement engine pod")
    healed = wait_ready(kube, namespace, "demo", 1)
    assert len(engine_pods(kube, namespace, "demo", include_terminating=False)) == 1
    assert healed["status"]["replicaStatuses"][0]["ready"]
    assert operator.metric("pypto_operator_reconciles_total", '{result="success"}') > 0
    # wait_ready may have seen the status from before the deletion, written before the operator noticed it (the
    # gauge then already reads 0 until the replacement is Ready): the gauge must come back to 1
    ready_gauge = f'{{name="demo",namespace="{namespace}",state="ready"}}'
    wait_for(lambda: operator.metric("pypto_operator_managed_replicas", ready_gauge) == 1, 90,
             "the managed-replicas gauge to count the ready replacement")

    # -- deleting the resource garbage-collects everything it owns
    cluster.kubectl("delete", "pps", "demo", "-n", namespace, "--wait=true", timeout=120)

    def all_gone() -> bool:
        left = cluster.kubectl("get", "pods,services,deployments,serviceaccounts,roles,rolebindings", "-n", namespace,
                               "-l", "app.kubernetes.io/instance=demo", "-o", "name").stdout.split()
        return not left

    wait_for(all_gone, 120, "the garbage collector to delete the children")
    assert kube.get(API_VERSION, KIND, "demo", namespace) is None
