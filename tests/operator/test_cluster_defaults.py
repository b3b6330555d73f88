"""Operator-level defaults on the real cluster: the fields a resource leaves out come from the operator's
--default-* flags (the chart's serving.* values), and `kubectl get pps` shows the resulting state."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.operator.clusterkit import (
    OperatorProcess,
    condition,
    engine_pods,
    get_resource,
    kubectl_apply,
    resource,
)
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster
DEVICE = "example.com/npu"  # no node offers it: the pods stay Pending, so no engine has to start
FLAGS = ["--default-device-resource", DEVICE, "--default-devices-per-node", "4",
         "--default-engine-image", "registry.local/pypto-serving:site", "--default-gateway-image",
         "registry.local/pypto-serving-gateway:site", "--default-routing", "round-robin",
         "--default-gateway-service-type", "NodePort"]
MODEL = {"name": "m", "path": "/models/m"}


def test_a_resource_without_device_resource_gets_the_operators_default_in_its_pods(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess]) -> None:
    start_operator(*FLAGS)
    kubectl_apply(cluster, namespace, resource("site", MODEL, replicas=2, parallel={"tensorParallelSize": 2},
                                               gateway={"enabled": True}))
    spec = get_resource(kube, namespace, "site")["spec"]
    assert "resourceName" not in spec.get("devices", {}) and "image" not in spec["engine"]
    assert "routing" not in spec["gateway"] and "serviceType" not in spec["gateway"]

    def degraded() -> dict[str, Any] | None:
        body = get_resource(kube, namespace, "site")
        pods = engine_pods(kube, namespace, "site")
        return body if len(pods) == 2 and (body.get("status") or {}).get("phase") == "Degraded" else None

    body = wait_for(degraded, 60, "two engine pods and phase Degraded (no node has the default device)")
    for pod in engine_pods(kube, namespace, "site"):
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"] == {DEVICE: "2"}
        assert container["resources"]["requests"] == {DEVICE: "2"}
        assert container["image"] == "registry.local/pypto-serving:site"
        assert pod["status"]["phase"] == "Pending"
    status = body["status"]  # type: ignore[index]
    assert status["deviceResourceName"] == DEVICE and status["devicesPerReplica"] == 2
    cond = condition(body, "Degraded")  # type: ignore[arg-type]
    assert cond["reason"] == "Unschedulable" and f"Insufficient {DEVICE}" in cond["message"]
    gateway = kube.get("apps/v1", "Deployment", "site-gateway", namespace)
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.local/pypto-serving-gateway:site"
    assert container["args"][container["args"].index("--policy") + 1] == "round-robin"
    service = kube.get("v1", "Service", "site-gateway", namespace)
    assert service["spec"]["type"] == "NodePort"

    # kubectl get pps: every printer column shows the real state (2 wanted, 0 ready, TP 2, 2 devices each)
    table = cluster.kubectl("get", "pps", "site", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "REPLICAS", "READY", "TP", "DEVICES/REPLICA", "PHASE", "AGE"]
    row = table[1].split()
    assert row[:6] == ["site", "2", "0", "2", "2", "Degraded"] and re.fullmatch(r"\d+(s|m\d*s?)", row[6]), table

    # the default perNode shapes the device group of a resource that sets none: 5 devices do not split evenly over
    # 4-device nodes (8 would be a 2-pod serving group), and the message names the flag
    kubectl_apply(cluster, namespace, resource("wide", MODEL, replicas=1, parallel={"tensorParallelSize": 5}))
    invalid = wait_for(lambda: (b := get_resource(kube, namespace, "wide")).get("status", {}).get("phase") == "Invalid"
                       and b, 30, "phase Invalid")
    message = condition(invalid, "SpecValid")["message"]  # type: ignore[arg-type]
    assert message.startswith("spec.parallel.tensorParallelSize:") and "--default-devices-per-node = 4" in message
    assert engine_pods(kube, namespace, "wide") == []
