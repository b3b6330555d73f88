"""Serving groups on the real local control plane, with real engines: a replica spanning two pods serves the
tokens transformers gives through the gateway; an unschedulable group releases its devices; losing a worker
recreates the whole group while the other group serves; scale-down drains whole groups under load; a restarted
operator finishes a half-created group without duplicating it.

The cluster of this module has 3 nodes with 2 devices each (issue 19's node shape), so it starts its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pypto_serving.kube import Kube, load_config
from tests.operator.clusterkit import (
    OperatorProcess,
    condition,
    engine_pods,
    get_resource,
    kubectl_apply,
    pod_ready,
    resource,
    wait_ready,
)
from tests.support.cluster import Cluster, start_cluster
from tests.support.common import wait_for
from tests.support.models import hf_greedy, tiny_model_dir

pytestmark = pytest.mark.cluster
SHAPE = {"nodes": 3, "devices_per_node": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This module's own cluster: 3 nodes x 2 devices (never the session's reused one)."""
    handle = start_cluster(tmp_path_factory.mktemp("groups-cluster"), owned=True, **SHAPE)
    try:
        yield handle
    finally:
        handle.close()
        handle.local.down()


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> str:
    return cluster.install_crd()


@pytest.fixture(scope="module")
def kube(cluster: Cluster) -> Iterator[Kube]:
    client = Kube(load_config(str(cluster.kubeconfig)))
    yield client
    client.close()


@pytest.fixture(scope="module")
def model_volume(cluster: Cluster) -> dict[str, Any]:
    path = tiny_model_dir("qwen3")
    return {"name": "tiny", "path": "/models/tiny", "mountPath": "/models/tiny",
            "volume": {"hostPath": {"path": str(path), "type": "Directory"}}}


def group_resource(name: str, model: dict[str, Any], tp: int, per_node: int, **spec: Any) -> dict[str, Any]:
    return resource(name, model, parallel={"tensorParallelSize": tp}, devices={"perNode": per_node},
                    engine={"dtype": "float32", "maxModelLen": 1024, "maxNumSeqs": 8, "startupTimeoutSeconds": 300,
                            "extraArgs": ["--device", "cpu", "--cpu-threads", "1"]}, **spec)


def pods_by_name(kube: Kube, namespace: str, name: str, live: bool = True) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in engine_pods(kube, namespace, name, include_terminating=not live)}


def gateway_url(kube: Kube, namespace: str, name: str) -> str:
    def ready() -> str | None:
        pods = kube.list("v1", "Pod", namespace,
                         labels={"app.kubernetes.io/instance": name, "app.kubernetes.io/component": "gateway"})
        return next((f"http://{p['status']['podIP']}:8080" for p in pods if pod_ready(p)), None)

    return str(wait_for(ready, 120, "a Ready gateway pod"))


def greedy_ids(url: str, prompt: list[int], n: int) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120, trust_env=False)
    response.raise_for_status()
    return [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


class Load:
    """Requests through the gateway, back to back from a few threads, counting failures."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url, self.ok, self.failed, self.errors = url, 0, 0, []  # type: ignore[var-annotated]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = {"model": "tiny", "prompt": "count with me", "max_tokens": 16, "ignore_eos": True}
        with httpx.Client(timeout=120, trust_env=False) as client:
            while not self.stop.is_set():
                try:
                    client.post(f"{self.url}/v1/completions", json=body).raise_for_status()
                    self.ok += 1
                except httpx.HTTPError as exc:
                    self.failed += 1
                    self.errors.append(repr(exc)[:200])

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(150)


def test_a_replica_spanning_two_pods_serves_and_an_unschedulable_group_releases_its_devices(
        cluster: Cluster, namespace: str, kube: Kube, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any]) -> None:
    start_operator()
    kubectl_apply(cluster, namespace, group_resource("big", model_volume, tp=4, per_node=2,
                                                     gateway={"enabled": True}, groupStartTimeoutSeconds=20))
    ready = wait_ready(kube, namespace, "big", 1, timeout=300)
    pods = pods_by_name(kube, namespace, "big")
    assert sorted(pods) == ["big-dp-0-0", "big-dp-0-1"]
    leader, worker = pods["big-dp-0-0"], pods["big-dp-0-1"]
    assert leader["metadata"]["labels"]["serving.pypto.io/role"] == "leader"
    assert leader["metadata"]["labels"]["serving.pypto.io/group-ready"] == "true"
    assert worker["metadata"]["labels"]["serving.pypto.io/serves"] == "false"
    assert leader["spec"]["nodeName"] != worker["spec"]["nodeName"]  # 2 devices each on 2-device nodes
    (group,) = ready["status"]["groups"]
    assert group["ready"] and group["serving"] == ["big-dp-0-0"]
    assert [(p["pod"], bool(p["node"]), bool(p["devices"])) for p in group["pods"]] == [
        ("big-dp-0-0", True, True), ("big-dp-0-1", True, True)]
    assert ready["status"]["podsPerGroup"] == 2 and ready["status"]["devicesPerPod"] == 2

    # greedy tokens through the gateway equal transformers' (4 ranks, one world across the two pods)
    url = gateway_url(kube, namespace, "big")
    model = str(tiny_model_dir("qwen3"))
    for prompt, n in (([5, 6, 7, 8, 9], 12), ([100, 200, 300], 7)):
        got = wait_for(lambda p=prompt, k=n: greedy_ids(url, p, k), 60, "an answer through the gateway")
        assert got == hf_greedy(model, prompt, n)

    # a second group needs 4 more devices; 2 are left: it is released after the timeout, and the status says why
    cluster.kubectl("scale", "pps", "big", "-n", namespace, "--replicas=2")

    def timed_out() -> dict[str, Any] | None:
        body = get_resource(kube, namespace, "big")
        degraded = condition(body, "Degraded")
        return body if degraded.get("reason") == "GroupStartTimeout" else None

    body = wait_for(timed_out, 120, "the unschedulable group to time out")
    message = condition(body, "Degraded")["message"]  # type: ignore[index]
    assert "not fully scheduled within 20s" in message and "Insufficient huawei.com/Ascend910" in message
    assert body["status"]["lastGroupStartFailure"]["group"] == 1  # type: ignore[index]
    wait_for(lambda: sorted(pods_by_name(kube, namespace, "big")) == ["big-dp-0-0", "big-dp-0-1"], 60,
             "the unschedulable group's pods to be deleted")
    # while creation backs off, the first group keeps serving
    assert greedy_ids(url, [5, 6, 7], 3) == hf_greedy(model, [5, 6, 7], 3)


def test_heal_scale_and_operator_restart_by_whole_groups(
        cluster: Cluster, namespace: str, kube: Kube, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any]) -> None:
    operator = start_operator()
    kubectl_apply(cluster, namespace, group_resource("grp", model_volume, tp=2, per_node=1, replicas=2,
                                                     gateway={"enabled": True}, drain={"timeoutSeconds": 60}))
    wait_ready(kube, namespace, "grp", 2, timeout=300)
    before = {name: p["metadata"]["uid"] for name, p in pods_by_name(kube, namespace, "grp").items()}
    assert sorted(before) == ["grp-dp-0-0", "grp-dp-0-1", "grp-dp-1-0", "grp-dp-1-1"]
    url = gateway_url(kube, namespace, "grp")
    load = Load(url)
    try:
        wait_for(lambda: load.ok >= 4, 60, "requests through the gateway")

        # -- deleting a worker recreates its whole group; the other group is untouched and keeps serving
        failed_before = load.failed
        cluster.kubectl("delete", "pod", "grp-dp-0-1", "-n", namespace, "--wait=false")
        def leader_going() -> bool:
            leader = pods_by_name(kube, namespace, "grp", live=False).get("grp-dp-0-0")
            return leader is None or bool(leader["metadata"].get("deletionTimestamp"))

        wait_for(leader_going, 30, "the leader of the broken group to be deleted too")
        broken = {before["grp-dp-0-0"], before["grp-dp-0-1"]}

        def healed() -> bool:
            live = pods_by_name(kube, namespace, "grp")
            groups = (get_resource(kube, namespace, "grp").get("status") or {}).get("groups") or []
            return (len(live) == 4 and not {p["metadata"]["uid"] for p in live.values()} & broken
                    and len(groups) == 2 and all(g["ready"] for g in groups))

        wait_for(healed, 300, "a new whole group Ready in place of the broken one")
        ready = wait_ready(kube, namespace, "grp", 2, timeout=60)
        after = {name: p["metadata"]["uid"] for name, p in pods_by_name(kube, namespace, "grp").items()}
        assert after["grp-dp-1-0"] == before["grp-dp-1-0"] and after["grp-dp-1-1"] == before["grp-dp-1-1"]
        recreated = {name for name in after if not name.startswith("grp-dp-1-")}
        assert len(recreated) == 2 and not recreated & {n for n in before if before[n] == after.get(n)}
        assert all(g["ready"] for g in ready["status"]["groups"])
        # only requests in flight on the broken group may fail (at most one per load thread): the gateway takes the
        # group out on the worker's own watch event, before the operator relabels or deletes anything
        assert load.failed - failed_before <= len(load.threads), load.errors

        # -- scale 2 -> 1 under load, the operator killed once the drain began: its successor finishes the drain
        failed_before, ok_before = load.failed, load.ok
        cluster.kubectl("scale", "pps", "grp", "-n", namespace, "--replicas=1")
        wait_for(lambda: any(p["metadata"]["labels"].get("serving.pypto.io/draining") == "true"
                             for p in pods_by_name(kube, namespace, "grp", live=False).values()), 60, "a drain")
        operator.kill()
        operator = start_operator()
        wait_for(lambda: len(pods_by_name(kube, namespace, "grp", live=False)) == 2, 180, "the drained group gone")
        wait_ready(kube, namespace, "grp", 1, timeout=60)
        wait_for(lambda: load.ok >= ok_before + 4, 60, "requests after the scale-down")
        assert load.failed == failed_before, load.errors[-5:]
    finally:
        load.finish()

    # -- the operator dies right after creating a new group's leader: its successor completes the same group
    cluster.kubectl("scale", "pps", "grp", "-n", namespace, "--replicas=2")
    leaders = wait_for(lambda: [n for n in pods_by_name(kube, namespace, "grp") if n.endswith("-0")
                                and n not in after] or None, 60, "the new group's leader")
    operator.kill()
    time.sleep(2)
    names = set(pods_by_name(kube, namespace, "grp"))
    assert len([n for n in names if n.endswith("-0")]) == 2  # no second new group
    start_operator()
    wait_for(lambda: len(pods_by_name(kube, namespace, "grp", live=False)) == 4
             and all(pod_ready(p) for p in pods_by_name(kube, namespace, "grp").values()), 300, "4 Ready pods")
    wait_ready(kube, namespace, "grp", 2, timeout=60)
    final = pods_by_name(kube, namespace, "grp", live=False)
    groups: dict[str, list[str]] = {}
    for name, pod in final.items():
        groups.setdefault(pod["metadata"]["labels"]["serving.pypto.io/dp-rank"], []).append(name)
    assert sorted(len(members) for members in groups.values()) == [2, 2], final.keys()  # whole groups, no extra
    assert set(leaders) <= set(final)  # the half-created group was completed, not replaced



def test_a_dp_ep_group_spans_two_pods_and_every_rank_serves(
        cluster: Cluster, namespace: str, kube: Kube, start_operator: Callable[..., OperatorProcess]) -> None:
    """DP=2 + EP of the tiny Qwen3-MoE: two pods, each a DP rank with its own OpenAI server, one expert-parallel
    world; both serve transformers' tokens, one request alone does not hang the group, the gateway routes to both."""
    start_operator()
    path = tiny_model_dir("qwen3-moe")
    model = {"name": "tiny", "path": "/models/tiny", "mountPath": "/models/tiny", "moe": True,
             "volume": {"hostPath": {"path": str(path), "type": "Directory"}}}
    body = group_resource("dpep", model, tp=1, per_node=2, gateway={"enabled": True})
    body["spec"]["parallel"] = {"tensorParallelSize": 1, "dataParallelSize": 2,
                                "expertParallel": {"enabled": True, "all2allBackend": "alltoall"}}
    kubectl_apply(cluster, namespace, body)
    ready = wait_ready(kube, namespace, "dpep", 1, timeout=300)
    pods = pods_by_name(kube, namespace, "dpep")
    (group,) = ready["status"]["groups"]
    # the group index may not be 0: on the local cluster every pod shares the host's ports, so a group whose store
    # port is still held by an earlier test's pods fails to start and is recreated whole at the next index
    names = [f"dpep-dp-{group['group']}-0", f"dpep-dp-{group['group']}-1"]
    assert sorted(pods) == names
    assert group["ready"] and sorted(group["serving"]) == names
    for rank, name in enumerate(sorted(pods)):
        labels = pods[name]["metadata"]["labels"]
        assert labels["serving.pypto.io/serves"] == "true" and labels["serving.pypto.io/group-ready"] == "true"
        load = httpx.get(f"http://{pods[name]['status']['podIP']}:8000/load", timeout=10, trust_env=False).json()
        assert (load["dp_rank"], load["dp_size"]) == (rank, 2)
    prompt = [17, 250, 3, 99, 640, 12, 7, 401]
    expected = hf_greedy(str(path), prompt, 10)
    # one request alone, to each rank directly: the other rank steps dummy batches
    for name in sorted(pods):
        assert greedy_ids(f"http://{pods[name]['status']['podIP']}:8000", prompt, 10) == expected
    url = gateway_url(kube, namespace, "dpep")

    def routable() -> list[str] | None:
        answer = httpx.get(f"{url}/replicas", timeout=10, trust_env=False).json()
        names = sorted(r["name"] for r in answer["replicas"] if r["state"] == "ready")
        return names if len(names) == 2 else None

    assert wait_for(routable, 60, "the gateway to route to both DP ranks") == names
    assert wait_for(lambda: greedy_ids(url, prompt, 10), 60, "an answer through the gateway") == expected
    cluster.kubectl("delete", "pps", "dpep", "-n", namespace, "--wait=true", timeout=120)


def test_a_tp2_x_pp2_replica_spans_two_pods_with_the_sampling_stage_on_the_leader(
        cluster: Cluster, namespace: str, kube: Kube, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any]) -> None:
    start_operator()
    body = group_resource("pipe", model_volume, tp=2, per_node=2, gateway={"enabled": True})
    body["spec"]["parallel"]["pipelineParallelSize"] = 2
    kubectl_apply(cluster, namespace, body)
    wait_ready(kube, namespace, "pipe", 1, timeout=300)
    pods = pods_by_name(kube, namespace, "pipe")
    assert sorted(pods) == ["pipe-dp-0-0", "pipe-dp-0-1"]
    args = pods["pipe-dp-0-1"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pipeline-parallel-size") + 1] == "2" and "--headless" in args
    url = gateway_url(kube, namespace, "pipe")
    model = str(tiny_model_dir("qwen3"))
    for prompt, n in (([5, 6, 7, 8, 9], 12), ([100, 200, 300], 7)):
        got = wait_for(lambda p=prompt, k=n: greedy_ids(url, p, k), 60, "an answer through the gateway")
        assert got == hf_greedy(model, prompt, n)
    cluster.kubectl("delete", "pps", "pipe", "-n", namespace, "--wait=true", timeout=120)
