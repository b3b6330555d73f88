"""On the real local cluster: a MoE replica with expert parallelism inside its pod (TP=2, EP over the two TP ranks)
is accepted, started with the engine's EP flags (no PYPTO_EP_* env), and serves `transformers`' greedy tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.operator.clusterkit import OperatorProcess, engine_pods, kubectl_apply, resource, wait_ready
from tests.support.models import hf_greedy, tiny_model_dir

pytestmark = pytest.mark.cluster


def test_moe_replica_with_expert_parallel_serves(cluster: Any, namespace: str, kube: Any,
                                                 operator: OperatorProcess) -> None:
    path = tiny_model_dir("qwen3-moe")
    model = {"name": "tiny-moe", "path": "/models/tiny", "mountPath": "/models/tiny", "moe": True,
             "volume": {"hostPath": {"path": str(path), "type": "Directory"}}}
    body = resource("moe", model, parallel={"tensorParallelSize": 2, "expertParallel": {
        "enabled": True, "placement": "round_robin", "all2allBackend": "alltoall"}})
    kubectl_apply(cluster, namespace, body)
    wait_ready(kube, namespace, "moe", 1)
    (pod,) = engine_pods(kube, namespace, "moe")
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--enable-expert-parallel"):][:5] == [
        "--enable-expert-parallel", "--expert-placement-strategy", "round_robin", "--all2all-backend", "alltoall"]
    assert not [e for e in container["env"] if e["name"].startswith(("PYPTO_EP", "PYPTO_DP"))]
    prompt = [17, 250, 3, 99, 640, 12, 7, 401]
    reply = httpx.post(f"http://{pod['status']['podIP']}:8000/v1/completions", trust_env=False, timeout=120, json={
        "model": "tiny-moe", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "logprobs": 0, "return_tokens_as_token_ids": True}).json()
    tokens = reply["choices"][0]["logprobs"]["tokens"]
    assert tokens == [f"token_id:{t}" for t in hf_greedy(path, prompt, 12)]
    cluster.kubectl("delete", "pps", "moe", "-n", namespace, "--wait=true", timeout=120)
