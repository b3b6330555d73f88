"""Serving groups, the pure parts: the shape a spec asks for, group pod manifests, observed groups, validation."""

from __future__ import annotations

from typing import Any

from pypto_serving import contract as c
from pypto_serving.operator import desired as d
from pypto_serving.operator.defaults import resolve
from pypto_serving.operator.groups import GroupShape, group_shape, group_views, split_problem
from pypto_serving.operator.state import PodView, pod_view
from pypto_serving.operator.types import PyptoServingSpec
from pypto_serving.operator.validation import validate
from tests.operator.corpus import minimal

OWNER = d.Owner("demo", "ns1", "uid-1")


def spec_of(**overrides: Any) -> PyptoServingSpec:
    return resolve(PyptoServingSpec.model_validate(minimal(**overrides)["spec"]))


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_shape_of_a_large_replica_and_of_a_plain_one() -> None:
    assert group_shape(spec_of(parallel={"tensorParallelSize": 4}, devices={"perNode": 2})) == GroupShape(2, 2)
    assert group_shape(spec_of(parallel={"tensorParallelSize": 12}, devices={"perNode": 8})) == GroupShape(2, 6)
    assert group_shape(spec_of(parallel={"tensorParallelSize": 16}, devices={"perNode": 8})) == GroupShape(2, 8)
    assert group_shape(spec_of(parallel={"tensorParallelSize": 4}, devices={"perNode": 8})) == GroupShape(1, 4)
    assert group_shape(spec_of(parallel={"tensorParallelSize": 16})) == GroupShape(1, 16)  # no perNode: no split
    dp = group_shape(spec_of(parallel={"tensorParallelSize": 2, "dataParallelSize": 3}))
    assert dp == GroupShape(3, 2, all_serve=True) and dp.serves(2)
    assert not GroupShape(2, 2).serves(1) and GroupShape(2, 2).serves(0)
    assert split_problem(9, 8) == ("9 devices do not split evenly into 2 pods of at most 8 devices "
                                   "(ceil(9 / 8) = 2 pods)")
    assert split_problem(24, 8) is None and split_problem(5, None) is None


def test_one_pod_groups_keep_their_hash_and_pod() -> None:
    """An operator with serving groups must not restart existing replicas: the hashes are the ones the previous
    operator computed (pinned), and the pod carries no group label."""
    assert d.spec_hash(spec_of()) == "89942af285"
    assert d.spec_hash(spec_of(replicas=3, parallel={"tensorParallelSize": 4}, devices={"perNode": 8})) == "8b61c7e2ae"
    pod = d.engine_pod(OWNER, spec_of(parallel={"tensorParallelSize": 4}, devices={"perNode": 8}), 1)
    assert pod["metadata"]["name"] == "demo-dp-1" and pod["spec"]["restartPolicy"] == "Always"
    assert not any(key in pod["metadata"]["labels"] for key in (c.L_GROUP_POD, c.L_ROLE, c.L_SERVES, c.L_GROUP_READY))
    assert not any(e["name"].startswith("PYPTO_GROUP") for e in pod["spec"]["containers"][0]["env"])


def test_large_replica_pods_leader_and_worker() -> None:
    spec = spec_of(replicas=2, parallel={"tensorParallelSize": 4}, devices={"perNode": 2})
    h = d.spec_hash(spec)
    assert h != d.spec_hash(spec_of(replicas=2, parallel={"tensorParallelSize": 4}))  # the split shapes the pods
    leader = d.engine_pod(OWNER, spec, 1, where=d.GroupPod(1, 0))
    worker = d.engine_pod(OWNER, spec, 1, where=d.GroupPod(1, 1, "10.0.0.7"))
    assert leader["metadata"]["name"] == "demo-dp-1-0" and worker["metadata"]["name"] == "demo-dp-1-1"
    assert leader["metadata"]["labels"] == {
        **d.engine_pod(OWNER, spec_of(), 1)["metadata"]["labels"], c.L_HASH: h,
        c.L_GROUP_POD: "0", c.L_GROUP_SIZE: "2", c.L_ROLE: "leader", c.L_SERVES: "true", c.L_GROUP_READY: "false"}
    wl = worker["metadata"]["labels"]
    assert (wl[c.L_RANK], wl[c.L_GROUP_POD], wl[c.L_ROLE], wl[c.L_SERVES]) == ("1", "1", "worker", "false")
    assert c.L_GROUP_READY not in wl
    for pod in (leader, worker):
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"] == {"huawei.com/Ascend910": "2"}
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["hostname"] == pod["metadata"]["name"] and pod["spec"]["subdomain"] == "demo-engines"
    lc, wc = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
    port = str(c.GROUP_PORT + 1)  # one port per group: the local cluster's pods share the host's addresses
    assert lc["args"][-8:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "$(POD_IP)",
                               "--master-port", port]
    assert wc["args"][-9:] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.7",
                               "--master-port", port, "--headless"]
    assert "--tensor-parallel-size" in wc["args"] and wc["args"][wc["args"].index("--tensor-parallel-size") + 1] == "4"
    env = env_map(wc)
    assert (env[c.ENV_GROUP_SIZE], env[c.ENV_GROUP_RANK], env[c.ENV_GROUP_LEADER_ADDR]) == ("2", "1", "10.0.0.7")
    assert env[c.ENV_GROUP_LEADER_HOST] == "demo-dp-1-0.demo-engines.ns1.svc"
    assert (env[c.ENV_GROUP_PORT], env[c.ENV_WORLD_SIZE]) == (port, "4")
    assert env_map(lc)[c.ENV_GROUP_LEADER_ADDR] == "$(POD_IP)" and env[c.ENV_HCCL_IF_IP] == "$(POD_IP)"
    assert {"name": c.GROUP_PORT_NAME, "containerPort": c.GROUP_PORT + 1, "protocol": "TCP"} in lc["ports"]
    assert len(wc["ports"]) == 1
    # group pods reach each other on any port; a plain replica's NetworkPolicy is unchanged
    policy = d.network_policy(OWNER, spec, "ops")["spec"]["ingress"]
    assert policy[1] == {"from": [{"podSelector": {"matchLabels": d.engine_selector("demo")}}]}
    assert len(d.network_policy(OWNER, spec_of(), "ops")["spec"]["ingress"]) == 1


def test_dp_ep_group_pods_all_serve() -> None:
    spec = spec_of(parallel={"tensorParallelSize": 2, "dataParallelSize": 2})
    rank1 = d.engine_pod(OWNER, spec, 0, where=d.GroupPod(0, 1, "10.0.0.9"))
    labels = rank1["metadata"]["labels"]
    assert labels[c.L_SERVES] == "true" and labels[c.L_GROUP_READY] == "false" and labels[c.L_ROLE] == "worker"
    (container,) = rank1["spec"]["containers"]
    assert container["args"][-8:] == ["--data-parallel-size", "2", "--data-parallel-rank", "1",
                                      "--data-parallel-address", "10.0.0.9", "--data-parallel-rpc-port",
                                      str(c.GROUP_PORT)]  # group 0
    assert container["resources"]["limits"] == {"huawei.com/Ascend910": "2"}
    assert env_map(container)[c.ENV_WORLD_SIZE] == "4"


def test_pod_view_reads_the_group_labels_and_groups_are_judged_by_their_own_size() -> None:
    spec = spec_of(parallel={"tensorParallelSize": 4}, devices={"perNode": 2})
    worker = d.engine_pod(OWNER, spec, 3, where=d.GroupPod(3, 1, "10.0.0.7"))
    worker["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    view = pod_view(worker)
    assert view is not None
    assert (view.rank, view.group_pod, view.group_size, view.serves, view.group_complete) == (3, 1, 2, False, False)
    assert view.created == 1767225600.0
    plain = pod_view(d.engine_pod(OWNER, spec_of(), 0))
    assert plain is not None and (plain.group_pod, plain.group_size, plain.serves) == (0, 1, True)
    leader = PodView(name="demo-dp-3-0", rank=3, group_size=2, phase="Running", ready=True, group_complete=True)
    (one, group) = group_views([leader, view, PodView(name="demo-dp-0", rank=0, ready=True)])
    assert (group.index, group.size, group.complete, group.leader, group.serving) == (3, 2, True, leader, [leader])
    assert not group.ready and group.broken() is None
    assert one.index == 0 and one.size == 1 and one.ready and one.active


def test_validation_of_group_shapes() -> None:
    assert validate(minimal(parallel={"tensorParallelSize": 4}, devices={"perNode": 2}))[1] == []
    _, problems = validate(minimal(parallel={"tensorParallelSize": 3}, devices={"perNode": 2}))
    assert [p.field for p in problems] == ["spec.parallel.tensorParallelSize"]
    assert "3 devices do not split evenly into 2 pods" in problems[0].message
    _, problems = validate(minimal(parallel={"tensorParallelSize": 4, "dataParallelSize": 2}, devices={"perNode": 2}))
    assert [p.field for p in problems] == ["spec.parallel.dataParallelSize"] * 2
    assert "needs spec.parallel.expertParallel.enabled" in problems[0].message
    assert "must fit on one node" in problems[1].message
    moe = {"model": {"name": "m", "path": "/m", "moe": True}}
    ep = {"tensorParallelSize": 2, "dataParallelSize": 2, "expertParallel": {"enabled": True}}
    assert validate(minimal(parallel=ep, devices={"perNode": 2}, **moe))[1] == []
    _, problems = validate(minimal(parallel={**ep, "tensorParallelSize": 1, "pipelineParallelSize": 2}, **moe))
    assert [p.field for p in problems] == ["spec.parallel.pipelineParallelSize"]
    assert "DP+EP groups with pipelineParallelSize > 1 are not supported yet" in problems[0].message
    pipeline = {"tensorParallelSize": 2, "pipelineParallelSize": 2}
    assert validate(minimal(parallel=pipeline, devices={"perNode": 2}))[1] == []  # PP across the pods
    long_name = "a" * 54
    _, problems = validate(minimal(long_name, parallel={"tensorParallelSize": 4}, devices={"perNode": 2}))
    assert [p.field for p in problems] == ["metadata.name"] and "at most 53 characters" in problems[0].message
    assert validate(minimal(long_name))[1] == []  # a one-pod group's names are as short as before
    _, problems = validate(minimal(engine={"extraArgs": ["--master-addr=1.2.3.4"]}))
    assert [p.field for p in problems] == ["spec.engine.extraArgs[0]"]
