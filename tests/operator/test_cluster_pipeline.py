"""On the real local cluster: a PyptoServing with TP=1 x PP=2 gets a pod with two devices and both parallel flags,
and serves completions through its gateway."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.operator.clusterkit import OperatorProcess, engine_pods, kubectl_apply, pod_ready, resource, wait_ready
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster


def test_tp1_x_pp2_serves_through_the_gateway(cluster: Any, namespace: str, kube: Any, operator: OperatorProcess,
                                              model_volume: dict[str, Any]) -> None:
    body = resource("pipe", model_volume, parallel={"tensorParallelSize": 1, "pipelineParallelSize": 2},
                    gateway={"enabled": True})
    kubectl_apply(cluster, namespace, body)
    ready = wait_ready(kube, namespace, "pipe", 1)
    assert ready["status"]["devicesPerReplica"] == 2
    (pod,) = engine_pods(kube, namespace, "pipe")
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == "2"
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"

    def gateway_ip() -> str | None:
        pods = kube.list(f"/api/v1/namespaces/{namespace}/pods",
                         labelSelector="app.kubernetes.io/instance=pipe,app.kubernetes.io/component=gateway")
        return next((p["status"]["podIP"] for p in pods if pod_ready(p)), None)

    url = f"http://{wait_for(gateway_ip, 120, 'a ready gateway pod')}:8080"

    def complete() -> httpx.Response | None:
        response = httpx.post(f"{url}/v1/completions", timeout=60, trust_env=False, json={
            "model": "tiny", "prompt": "Two stages say", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True})
        return response if response.status_code == 200 else None  # the gateway may not have seen the engine yet

    response = wait_for(complete, 60, "a completion through the gateway")
    assert response.headers["x-pypto-replica"] == pod["metadata"]["name"]  # type: ignore[union-attr]
    assert response.json()["usage"]["completion_tokens"] == 8  # type: ignore[union-attr]
    metrics = httpx.get(f"http://{pod['status']['podIP']}:8000/metrics", timeout=10, trust_env=False).text
    assert 'pypto:pp_stage_idle_ratio{model_name="tiny",stage="1"}' in metrics
