"""Kubernetes discovery on the real local cluster: engine pods running real engines, the gateway running as a pod
with its ServiceAccount (in-cluster config, RBAC list/watch pods), reached by pod IP (there is no kube-proxy)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.common import REPO_ROOT, wait_for

pytestmark = pytest.mark.cluster

BIN = str(REPO_ROOT / ".venv" / "bin" / "pypto-serving")
INSTANCE = "gwtest"
SELECTOR = f"app.kubernetes.io/instance={INSTANCE},app.kubernetes.io/component=engine"
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def engine_pod(name: str, model_dir: Path, instance: str = INSTANCE) -> dict:
    labels = {"app.kubernetes.io/name": "pypto-serving", "app.kubernetes.io/instance": instance,
              "app.kubernetes.io/component": "engine"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": {
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": "engine", "image": "pypto-serving:latest",
            "command": [BIN, "engine", "--model", str(model_dir), "--host", "$(POD_IP)", "--port", "8000",
                        "--max-model-len", "512"],
            "env": [POD_IP_ENV, {"name": "HF_HUB_OFFLINE", "value": "1"}],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 1}}]}}


def gateway_manifests(namespace: str) -> list[dict]:
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "gateway"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "gateway"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "gateway"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gateway"},
         "subjects": [{"kind": "ServiceAccount", "name": "gateway", "namespace": namespace}]},
    ]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gateway", "labels": {"app": "gateway"}}, "spec": {
        "serviceAccountName": "gateway", "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": "gateway", "image": "pypto-serving:latest",
            "command": [BIN, "gateway", "--host", "$(POD_IP)", "--port", "8080", "--selector", SELECTOR,
                        "--policy", "round-robin"],
            "env": [POD_IP_ENV, {"name": "POD_NAMESPACE",
                                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 1}}]}}
    return [*rbac, pod]


def apply(cluster, namespace: str, *objects: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                           "items": list(objects)}))


def pod_ip(cluster, namespace: str, name: str) -> str:
    return cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.podIP}").stdout.strip()


def test_gateway_pod_follows_engine_pods_readiness_and_draining_label(cluster, namespace: str,
                                                                      tiny_qwen3_dir: Path) -> None:
    apply(cluster, namespace, engine_pod("gwtest-dp-0", tiny_qwen3_dir), engine_pod("gwtest-dp-1", tiny_qwen3_dir),
          engine_pod("other-dp-0", tiny_qwen3_dir, instance="other"), *gateway_manifests(namespace))
    wait_for(lambda: pod_ip(cluster, namespace, "gateway"), 60, "the gateway pod's IP")
    url = f"http://{pod_ip(cluster, namespace, 'gateway')}:8080"

    def replicas() -> dict[str, dict]:
        return {r["name"]: r for r in httpx.get(url + "/replicas", timeout=5).json()["replicas"]}

    both = {"gwtest-dp-0", "gwtest-dp-1"}
    wait_for(lambda: {n for n, r in replicas().items() if r["state"] == "ready"} == both, 240,
             "both engine pods ready in the gateway (and the other instance's pod ignored)")
    assert set(replicas()) == both
    assert replicas()["gwtest-dp-0"]["address"] == f"http://{pod_ip(cluster, namespace, 'gwtest-dp-0')}:8000"

    def served(n: int) -> Counter:
        out: Counter = Counter()
        for _ in range(n):
            resp = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert resp.status_code == 200, resp.text
            out[resp.headers["x-pypto-replica"]] += 1
        return out

    assert set(served(4)) == both
    # the operator's draining label: one watch event takes the pod out of rotation
    cluster.kubectl("label", "pod", "gwtest-dp-0", "-n", namespace, "serving.pypto.io/draining=true")
    wait_for(lambda: replicas()["gwtest-dp-0"]["state"] == "draining", 10, "the draining label seen")
    assert served(6) == Counter({"gwtest-dp-1": 6})
    # a deleted pod disappears; with the other one draining there is no replica left: 503 with a clear message
    cluster.kubectl("delete", "pod", "gwtest-dp-1", "-n", namespace, "--wait=false")
    wait_for(lambda: "gwtest-dp-1" not in replicas(), 30, "the deleted pod removed")
    resp = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_replicas"
    # the label removed: back in rotation
    cluster.kubectl("label", "pod", "gwtest-dp-0", "-n", namespace, "serving.pypto.io/draining-")
    wait_for(lambda: replicas()["gwtest-dp-0"]["state"] == "ready", 10, "the pod back in rotation")
    assert served(2) == Counter({"gwtest-dp-0": 2})
