"""The local Kubernetes substrate, really exercised: real apiserver, controllers, scheduler and the localkube node
agent running pods as host processes on loopback pod IPs."""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from hack.localkube import pki, processes
from hack.localkube.tools import REPO_ROOT
from tests.support.cluster import Cluster
from tests.support.common import free_port, wait_for

pytestmark = pytest.mark.cluster
RESOURCE = "huawei.com/Ascend910"
SLEEPER = ["python", "-c", "import time; print('up', flush=True); time.sleep(3600)"]


def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A one-container pod running ``command`` (the image is ignored by the node agent)."""
    container = {"name": spec.pop("container_name", "main"), "image": "pypto-serving:test", "command": command}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **spec.pop("metadata", {})},
            "spec": {"containers": [container], "terminationGracePeriodSeconds": 5, **spec}}


def read_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """The pod as JSON (plain dicts, like kubectl shows it)."""
    return json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def wait_pod(cluster: Cluster, namespace: str, name: str, check: Callable[[dict[str, Any]], object], what: str,
             timeout: float = 90) -> dict[str, Any]:
    """Wait until ``check(pod)`` holds; the failure message carries the pod status and the agent log."""
    last: dict[str, Any] = {}

    def condition() -> object:
        nonlocal last
        last = read_pod(cluster, namespace, name)
        return check(last)

    try:
        wait_for(condition, timeout, f"pod {namespace}/{name}: {what}", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatus: {json.dumps(last.get('status'), indent=1)}\n"
                             f"node agent log:\n{cluster.agent_log(30)}") from None
    return last


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    """A pod condition by type ({} if absent)."""
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == kind), {})


def container_pid(pod: dict[str, Any], index: int = 0) -> int:
    """Host pid of a running container (the node agent reports containerID localkube://<pid>)."""
    return int(pod["status"]["containerStatuses"][index]["containerID"].removeprefix("localkube://"))


def is_ready(pod: dict[str, Any]) -> bool:
    """Pod Ready condition is True."""
    return condition(pod, "Ready").get("status") == "True"


def test_nodes_are_ready_with_devices(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert len(nodes) == 2
    for node in nodes:
        assert node["status"]["allocatable"][RESOURCE] == "8"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        assert not node["spec"].get("taints")
        assert node["status"]["addresses"][0]["address"].startswith("127.")
    lease = cluster.kubectl("get", "lease", "-n", "kube-node-lease", nodes[0]["metadata"]["name"], "-o", "json")
    assert json.loads(lease.stdout)["spec"]["holderIdentity"] == nodes[0]["metadata"]["name"]


def test_deployment_serves_on_its_pod_ip_and_deleting_it_stops_the_process(cluster: Cluster, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [{
                "name": "web", "image": "python:3.11",
                "command": ["python", "-m", "http.server", "8000", "--bind", "$(POD_IP)"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8000}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]}}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(deployment))

    def available() -> bool:
        status = json.loads(cluster.kubectl("get", "deploy", "web", "-n", namespace, "-o", "json").stdout)["status"]
        return status.get("availableReplicas") == 1 and status.get("readyReplicas") == 1

    wait_for(available, 90, "deployment web to become available", interval=0.5)
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json").stdout)["items"]
    assert len(pods) == 1 and is_ready(pods[0])
    pod_ip = pods[0]["status"]["podIP"]
    assert pod_ip.startswith("127.") and pod_ip != "127.0.0.1"
    response = httpx.get(f"http://{pod_ip}:8000/", timeout=10, trust_env=False)
    assert response.status_code == 200
    pid = container_pid(pods[0])
    assert processes.process_marker(pid) == str(cluster.dir)

    cluster.kubectl("delete", "deploy", "web", "-n", namespace, "--wait=false")
    wait_for(lambda: not processes.is_alive(pid), 60, f"pod process {pid} to exit after deleting the deployment")
    wait_for(lambda: not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"],
             60, "the deployment's pods to be deleted (garbage collection of ReplicaSet and pods)")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{pod_ip}:8000/", timeout=5, trust_env=False)


def test_owner_reference_garbage_collection_deletes_children(cluster: Cluster, namespace: str) -> None:
    core = cluster.core_v1()
    parent = core.create_namespaced_config_map(namespace, {"metadata": {"name": "parent"}, "data": {"k": "v"}})
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [owner]}})
    core.create_namespaced_pod(namespace, pod_manifest("child-pod", SLEEPER, metadata={"ownerReferences": [owner]}))
    pod = wait_pod(cluster, namespace, "child-pod", lambda p: p["status"].get("phase") == "Running", "Running")
    pid = container_pid(pod)

    core.delete_namespaced_config_map("parent", namespace)

    def children_gone() -> bool:
        names = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
        pods = core.list_namespaced_pod(namespace).items
        return "child" not in names and not pods

    wait_for(children_gone, 90, "the garbage collector to delete the child ConfigMap and pod", interval=0.5)
    wait_for(lambda: not processes.is_alive(pid), 30, f"the child pod's process {pid} to exit")


def test_pod_with_four_devices_gets_four_distinct_ids(cluster: Cluster, namespace: str) -> None:
    command = ["sh", "-c", "echo devices=$ASCEND_RT_VISIBLE_DEVICES; sleep 3600"]
    limits = {"limits": {RESOURCE: "4"}, "requests": {RESOURCE: "4"}}
    cluster.core_v1().create_namespaced_pod(namespace, pod_manifest("npu4", command, container={"resources": limits}))
    pod = wait_pod(cluster, namespace, "npu4", lambda p: p["status"].get("phase") == "Running", "Running")
    annotated = pod["metadata"]["annotations"]["huawei.com/AscendReal"].split(",")
    assert len(annotated) == 4 and len(set(annotated)) == 4 and all(a.startswith("Ascend910-") for a in annotated)
    wait_for(lambda: "devices=" in cluster.pod_logs(namespace, "npu4"), 30, "the pod to print its devices")
    line = next(x for x in cluster.pod_logs(namespace, "npu4").splitlines() if x.startswith("devices="))
    ids = line.removeprefix("devices=").split(",")
    assert len(set(ids)) == 4 and all(0 <= int(i) < 8 for i in ids)
    assert sorted(f"Ascend910-{i}" for i in ids) == sorted(annotated)


def test_pod_asking_for_sixteen_devices_stays_pending_with_the_schedulers_reason(cluster: Cluster,
                                                                                 namespace: str) -> None:
    limits = {"limits": {RESOURCE: "16"}, "requests": {RESOURCE: "16"}}
    cluster.core_v1().create_namespaced_pod(namespace, pod_manifest("npu16", SLEEPER, container={"resources": limits}))
    pod = wait_pod(cluster, namespace, "npu16", lambda p: condition(p, "PodScheduled").get("status") == "False",
                   "PodScheduled=False from the scheduler")
    scheduled = condition(pod, "PodScheduled")
    assert scheduled["reason"] == "Unschedulable"
    assert f"Insufficient {RESOURCE}" in scheduled["message"]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_crashing_container_restarts_with_rising_count_and_crash_loop_back_off(cluster: Cluster,
                                                                               namespace: str) -> None:
    command = ["sh", "-c", "echo crashing; exit 3"]
    cluster.core_v1().create_namespaced_pod(namespace, pod_manifest("crasher", command))

    def crash_looping(pod: dict[str, Any]) -> bool:
        statuses = pod["status"].get("containerStatuses") or []
        return bool(statuses) and statuses[0]["restartCount"] >= 2 and \
            statuses[0]["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"

    pod = wait_pod(cluster, namespace, "crasher", crash_looping, "restartCount >= 2 in CrashLoopBackOff", 120)
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["lastState"]["terminated"]["reason"] == "Error"
    assert pod["status"]["phase"] == "Running" and not is_ready(pod)
    assert "crashing" in cluster.pod_logs(namespace, "crasher")
    first = status["restartCount"]
    wait_pod(cluster, namespace, "crasher",
             lambda p: p["status"]["containerStatuses"][0]["restartCount"] > first, "a further restart", 120)


def test_in_cluster_config_lists_pods_with_the_service_account_token(cluster: Cluster, namespace: str) -> None:
    rbac = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pod-reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}]},
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": rbac}))
    script = ("import os; from kubernetes import client, config; config.load_incluster_config(); "
              "pods = client.CoreV1Api().list_namespaced_pod(os.environ['NS']).items; "
              "print('listed', sorted(p.metadata.name for p in pods), flush=True)")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "lister"},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never", "containers": [{
                   "name": "lister", "image": "pypto-serving:test", "command": ["python", "-c", script],
                   "env": [{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]}]}}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    def finished() -> dict[str, Any] | None:
        status = json.loads(cluster.kubectl("get", "job", "lister", "-n", namespace, "-o", "json").stdout)["status"]
        return status if status.get("succeeded") or status.get("failed") else None

    try:
        status = wait_for(finished, 120, "job lister to finish", interval=0.5)
    finally:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=lister", "-o", "name").stdout.split()
    pod_name = pods[0].removeprefix("pod/")
    log = cluster.pod_logs(namespace, pod_name)
    assert status.get("succeeded") == 1, f"the in-cluster client failed:\n{log}"
    assert f"listed ['{pod_name}']" in log
    assert read_pod(cluster, namespace, pod_name)["status"]["phase"] == "Succeeded"


def test_env_and_volumes_appear_like_in_a_container(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    core = cluster.core_v1()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"},
                                                  "data": {"mode": "fast", "serving.json": '{"tp": 4}'}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "api-key"},
                                              "data": {"key": base64.b64encode(b"s3cret").decode()}})
    host_dir = tmp_path / "models"
    host_dir.mkdir()
    (host_dir / "weights.txt").write_text("tiny weights\n")
    script = ("echo mode=$MODE key=$API_KEY ip=$MY_IP combined=$COMBINED; cat /etc/serving/serving.json; echo; "
              "cat weights.txt; df -P /dev/shm | tail -1 | awk '{print \"shm=\" $1}'; "
              "echo scratch > /scratch/f && cat /scratch/f; ls /var/run/secrets/kubernetes.io/serviceaccount; "
              "cat /etc/podinfo/labels; echo")
    container = {
        "workingDir": "/models",
        "env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api-key", "key": "key"}}},
                {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "COMBINED", "value": "$(MODE)-$(MY_IP)"}],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/serving"},
                         {"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": "/scratch"},
                         {"name": "podinfo", "mountPath": "/etc/podinfo"}]}
    volumes = [{"name": "config", "configMap": {"name": "settings"}},
               {"name": "models", "hostPath": {"path": str(host_dir), "type": "Directory"}},
               {"name": "shm", "emptyDir": {"medium": "Memory"}}, {"name": "scratch", "emptyDir": {}},
               {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels",
                                                              "fieldRef": {"fieldPath": "metadata.labels"}}]}}]
    core.create_namespaced_pod(namespace, pod_manifest("envvol", ["sh", "-c", script], container=container,
                                                       volumes=volumes, restartPolicy="Never",
                                                       metadata={"labels": {"tier": "engine"}}))
    pod = wait_pod(cluster, namespace, "envvol", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                   "the pod to finish")
    log = cluster.pod_logs(namespace, "envvol")
    assert pod["status"]["phase"] == "Succeeded", log
    ip = pod["status"]["podIP"]
    assert f"mode=fast key=s3cret ip={ip} combined=fast-{ip}" in log
    for expected in ('{"tp": 4}', "tiny weights", "shm=tmpfs", "scratch", "ca.crt", "token", 'tier="engine"'):
        assert expected in log, f"{expected!r} missing from the pod log:\n{log}"
    assert not Path("/scratch/f").exists()  # the emptyDir was mounted only inside the pod's mount namespace


def test_an_empty_dir_at_tmp_does_not_hide_the_other_volumes(cluster: Cluster, namespace: str) -> None:
    """The cluster dir (so every volume's host directory) is under /tmp; an emptyDir at /tmp is mounted first."""
    assert str(cluster.dir).startswith("/tmp/")
    core = cluster.core_v1()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "tmp-cfg"}, "data": {"mode": "fast"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "tmp-sec"},
                                              "data": {"key": base64.b64encode(b"s3cret").decode()}})
    script = ("echo mode=$(cat /tmp/cfg/mode) key=$(cat /etc/sec/key) "
              "ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace); "
              "python -c 'from kubernetes import client, config; config.load_incluster_config(); "
              "client.CoreV1Api().list_namespaced_config_map(open(\"/var/run/secrets/kubernetes.io/serviceaccount/"
              "namespace\").read()); print(\"token accepted\")'; "
              "echo scratch > /tmp/f && echo tmp=$(cat /tmp/f) && ls /tmp | tr '\\n' ' '")
    container = {"volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                                  {"name": "cfg", "mountPath": "/tmp/cfg", "readOnly": True},
                                  {"name": "sec", "mountPath": "/etc/sec", "readOnly": True}]}
    volumes = [{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "tmp-cfg"}},
               {"name": "sec", "secret": {"secretName": "tmp-sec"}}]
    rbac = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "cm-reader"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "cm-reader"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}]},
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": rbac}))
    core.create_namespaced_pod(namespace, pod_manifest("tmpvol", ["sh", "-c", script], container=container,
                                                       volumes=volumes, restartPolicy="Never"))
    pod = wait_pod(cluster, namespace, "tmpvol", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                   "the pod to finish")
    log = cluster.pod_logs(namespace, "tmpvol")
    assert pod["status"]["phase"] == "Succeeded", log
    assert f"mode=fast key=s3cret ns={namespace}" in log and "token accepted" in log, log
    assert "tmp=scratch" in log, log
    # /tmp is the emptyDir: the host's /tmp is not visible, except the project environment the pod runs from (its
    # "image"), bound back in when the checkout itself lives under /tmp
    listing = set(log.strip().splitlines()[-1].split())
    image_tops = {Path(p).relative_to("/tmp").parts[0] for p in (sys.prefix, str(REPO_ROOT)) if p.startswith("/tmp/")}
    assert listing == {"cfg", "f"} | image_tops, log
    mounted = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounted  # the token volume came from admission


def test_init_containers_run_first_and_failures_fail_a_never_restart_pod(cluster: Cluster, namespace: str) -> None:
    shared = [{"name": "work", "mountPath": "/work-dir"}]
    pod = pod_manifest("with-init", ["sh", "-c", "cat /work-dir/prepared"], restartPolicy="Never",
                       container={"volumeMounts": shared}, volumes=[{"name": "work", "emptyDir": {}}],
                       initContainers=[{"name": "prepare", "image": "none", "volumeMounts": shared,
                                        "command": ["sh", "-c", "echo prepared-by-init > /work-dir/prepared"]}])
    core = cluster.core_v1()
    core.create_namespaced_pod(namespace, pod)
    done = wait_pod(cluster, namespace, "with-init", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                    "the pod to finish")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert "prepared-by-init" in cluster.pod_logs(namespace, "with-init", "main")

    failing = pod_manifest("bad-init", SLEEPER, restartPolicy="Never",
                           initContainers=[{"name": "prepare", "image": "none", "command": ["sh", "-c", "exit 7"]}])
    core.create_namespaced_pod(namespace, failing)
    failed = wait_pod(cluster, namespace, "bad-init", lambda p: p["status"].get("phase") == "Failed", "Failed")
    assert failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert failed["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    assert not (cluster.pod_dir(namespace, "bad-init") / "logs" / "main").exists()  # main never started


def test_missing_config_map_holds_the_container_until_it_exists(cluster: Cluster, namespace: str) -> None:
    container = {"env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "mode"}}}]}
    core = cluster.core_v1()
    core.create_namespaced_pod(namespace, pod_manifest("waits", ["sh", "-c", "echo mode=$MODE; sleep 3600"],
                                                       container=container))

    def config_error(pod: dict[str, Any]) -> bool:
        statuses = pod["status"].get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"

    pod = wait_pod(cluster, namespace, "waits", config_error, "CreateContainerConfigError")
    assert 'configMap "later" not found' in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert pod["status"]["phase"] == "Pending"
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "later"}, "data": {"mode": "now"}})
    wait_pod(cluster, namespace, "waits", lambda p: p["status"].get("phase") == "Running", "Running", 60)
    wait_for(lambda: "mode=now" in cluster.pod_logs(namespace, "waits"), 30, "the container to see the ConfigMap")


def test_probes_gate_readiness_and_liveness_restarts(cluster: Cluster, namespace: str) -> None:
    marker = Path(f"/tmp/localkube-ready-{namespace}")  # the test decides when the pod becomes ready
    marker.unlink(missing_ok=True)
    readiness = {"exec": {"command": ["test", "-f", str(marker)]}, "periodSeconds": 1, "failureThreshold": 1}
    core = cluster.core_v1()
    core.create_namespaced_pod(namespace, pod_manifest("slow-ready", SLEEPER, container={"readinessProbe": readiness}))
    pod = wait_pod(cluster, namespace, "slow-ready", lambda p: p["status"].get("phase") == "Running", "Running")

    def probe_failed() -> bool:
        listed = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                 "involvedObject.name=slow-ready,reason=Unhealthy", "-o", "json").stdout
        return any(e.get("count", 1) >= 2 and "Readiness probe failed" in e["message"]
                   for e in json.loads(listed)["items"])

    wait_for(probe_failed, 60, "two failed readiness probes (one aggregated Unhealthy event)", interval=0.5)
    pod = read_pod(cluster, namespace, "slow-ready")
    assert not is_ready(pod), "the pod must not be Ready before its readiness probe passes"
    assert condition(pod, "Ready")["reason"] == "ContainersNotReady"
    marker.touch()
    try:
        wait_pod(cluster, namespace, "slow-ready", is_ready, "Ready once the marker file exists", 60)
        marker.unlink()
        wait_pod(cluster, namespace, "slow-ready", lambda p: not is_ready(p), "unready once the marker is gone", 60)
    finally:
        marker.unlink(missing_ok=True)

    liveness = {"tcpSocket": {"port": free_port()}, "initialDelaySeconds": 1, "periodSeconds": 1,
                "failureThreshold": 2, "timeoutSeconds": 1}
    core.create_namespaced_pod(namespace, pod_manifest("not-alive", SLEEPER, container={"livenessProbe": liveness},
                                                       terminationGracePeriodSeconds=1))
    pod = wait_pod(cluster, namespace, "not-alive",
                   lambda p: (p["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 1,
                   "a restart after the liveness probe fails", 90)
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.name=not-alive", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"Unhealthy", "Killing"} <= reasons


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(cluster: Cluster, namespace: str) -> None:
    polite = ("import signal, sys, time\n"
              "def bye(*_):\n    print('got SIGTERM', flush=True)\n    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(3600)\n")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('up', flush=True)\ntime.sleep(3600)\n")
    core = cluster.core_v1()
    core.create_namespaced_pod(namespace, pod_manifest("polite", ["python", "-c", polite],
                                                       terminationGracePeriodSeconds=30))
    core.create_namespaced_pod(namespace, pod_manifest("stubborn", ["python", "-c", stubborn],
                                                       terminationGracePeriodSeconds=3))
    pids = {}
    for name in ("polite", "stubborn"):
        pod = wait_pod(cluster, namespace, name, lambda p: p["status"].get("phase") == "Running", "Running")
        pids[name] = container_pid(pod)
        wait_for(lambda n=name: "up" in cluster.pod_logs(namespace, n), 30, f"{name} to start its handler")

    def gone(name: str) -> bool:
        try:
            core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    started = time.monotonic()
    core.delete_namespaced_pod("polite", namespace)
    wait_for(lambda: gone("polite"), 20, "the polite pod to exit on SIGTERM well before its 30s grace period")
    assert "got SIGTERM" in cluster.pod_logs(namespace, "polite")
    assert not processes.is_alive(pids["polite"])

    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: gone("stubborn"), 30, "the stubborn pod to be killed after its 3s grace period")
    assert time.monotonic() - started >= 2.5, "SIGKILL came before the grace period ended"
    assert not processes.is_alive(pids["stubborn"])


def test_kubectl_logs_reads_container_logs_through_the_node(cluster: Cluster, namespace: str) -> None:
    command = ["sh", "-c", "for i in 1 2 3; do echo line-$i; done; sleep 3600"]
    cluster.core_v1().create_namespaced_pod(namespace, pod_manifest("chatty", command))
    wait_pod(cluster, namespace, "chatty", lambda p: p["status"].get("phase") == "Running", "Running")
    wait_for(lambda: "line-3" in cluster.kubectl("logs", "chatty", "-n", namespace).stdout, 30, "kubectl logs")
    tail = cluster.kubectl("logs", "chatty", "-n", namespace, "--tail=1").stdout
    assert tail.strip() == "line-3"


@pytest.fixture
def deny_webhook(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real HTTPS admission webhook on 127.0.0.1 that denies pods labelled deny=yes; yields (url, caBundle)."""
    ca = pki.create_ca(tmp_path, "webhook-ca")
    cert = pki.issue(ca, tmp_path, "webhook", "webhook", server=True, ip_addresses=("127.0.0.1",))
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request = review["request"]
            calls.append(request.get("name", ""))
            labels = request["object"]["metadata"].get("labels") or {}
            allowed = labels.get("deny") != "yes"
            response = {"uid": request["uid"], "allowed": allowed}
            if not allowed:
                response["status"] = {"code": 403, "message": "denied by the test webhook"}
            body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                               "response": response}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert.cert), str(cert.key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}/validate", base64.b64encode(ca.cert.read_bytes()).decode()
    finally:
        server.shutdown()
        server.server_close()


def test_apiserver_calls_admission_webhooks_by_url(cluster: Cluster, namespace: str,
                                                   deny_webhook: tuple[str, str]) -> None:
    url, ca_bundle = deny_webhook
    name = f"deny-{namespace}"
    config = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
              "metadata": {"name": name},
              "webhooks": [{"name": "deny.localkube.pypto.io", "clientConfig": {"url": url, "caBundle": ca_bundle},
                            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                       "resources": ["pods"]}],
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                            "objectSelector": {"matchLabels": {"webhook-test": "yes"}},
                            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                            "timeoutSeconds": 10}]}
    # Kubernetes 1.20 does not label namespaces with their name yet: do it for the selector.
    cluster.kubectl("label", "namespace", namespace, f"kubernetes.io/metadata.name={namespace}", "--overwrite")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        core = cluster.core_v1()
        denied = pod_manifest("denied", SLEEPER, metadata={"labels": {"webhook-test": "yes", "deny": "yes"}})

        def rejected() -> bool:  # the webhook configuration takes a moment to reach the apiserver's cache
            try:
                core.create_namespaced_pod(namespace, denied)
            except ApiException as exc:
                return exc.status == 403 and "denied by the test webhook" in exc.body
            core.delete_namespaced_pod("denied", namespace, grace_period_seconds=0)
            return False

        wait_for(rejected, 30, "the apiserver to call the webhook and reject the pod", interval=1)
        allowed = pod_manifest("allowed", SLEEPER, metadata={"labels": {"webhook-test": "yes"}})
        core.create_namespaced_pod(namespace, allowed)
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found")


def test_helm_installs_a_chart_and_waits_for_its_deployment(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe-web\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("port: 8000\n")
    (chart / "templates" / "deployment.yaml").write_text("""\
apiVersion: apps/v1
kind: Deployment
metadata: {name: "{{ .Release.Name }}"}
spec:
  replicas: 1
  selector: {matchLabels: {app: "{{ .Release.Name }}"}}
  template:
    metadata: {labels: {app: "{{ .Release.Name }}"}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: python:3.11
        command: [python, -m, http.server, "{{ .Values.port }}", --bind, $(POD_IP)]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        readinessProbe: {tcpSocket: {port: {{ .Values.port }}}, periodSeconds: 1}
""")
    cluster.helm("install", "web", str(chart), "-n", namespace, "--set", "port=8123", "--wait", "--timeout", "120s")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json").stdout)["items"]
    assert len(pods) == 1 and is_ready(pods[0])
    assert httpx.get(f"http://{pods[0]['status']['podIP']}:8123/", timeout=10, trust_env=False).status_code == 200
    assert "deployed" in cluster.helm("status", "web", "-n", namespace).stdout
    cluster.helm("uninstall", "web", "-n", namespace, "--wait", "--timeout", "60s")
    wait_for(lambda: not processes.is_alive(container_pid(pods[0])), 30, "the chart's pod process to exit")
