"""A cluster of its own: `down` leaves no process behind, `up` on the same directory resumes the cluster (and
its pods), and a killed node agent takes its pod processes with it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from hack.localkube import ClusterConfig, ClusterStartError, LocalCluster, processes
from hack.localkube.tools import MissingToolError
from tests.support.cluster import Cluster
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster


def running_pid(cluster: Cluster, name: str, not_pid: int | None = None) -> int:
    """Wait until pod ``name`` in default runs a process (other than ``not_pid``); return its host pid."""

    def pid() -> int | None:
        pod = json.loads(cluster.kubectl("get", "pod", name, "-o", "json").stdout)
        statuses = pod["status"].get("containerStatuses") or []
        if pod["status"].get("phase") != "Running" or not statuses or "running" not in statuses[0]["state"]:
            return None
        found = int(statuses[0]["containerID"].removeprefix("localkube://"))
        return found if found != not_pid and processes.is_alive(found) else None

    return int(wait_for(pid, 90, f"pod {name} to run a new process", interval=0.5))


def test_down_stops_everything_and_up_resumes(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path / "cluster", ClusterConfig(nodes=1, devices_per_node=4, die_with_parent=True,
                                                            restart_backoff_base=1.0))
    cluster = Cluster(local)
    try:
        local.up()
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"}, "spec": {
            "terminationGracePeriodSeconds": 2, "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            "containers": [{"name": "main", "image": "none", "command": ["sh", "-c", "sleep 3600 & exec sleep 3601"],
                            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}]}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        first = running_pid(cluster, "sleeper")
        uid = json.loads(cluster.kubectl("get", "pod", "sleeper", "-o", "json").stdout)["metadata"]["uid"]
        assert list(Path("/dev/shm").glob(f"localkube-{uid}-*"))
        marked = processes.marked_pids(local.dir)
        assert first in marked and len(marked) >= 7  # etcd, 3 control-plane binaries, agent, 2 pod processes

        local.down()
        assert processes.marked_pids(local.dir) == []
        assert not any(processes.is_alive(pid) for pid in marked)
        assert not list(Path("/dev/shm").glob(f"localkube-{uid}-*"))

        local.up()  # same directory: etcd keeps the pod, the node agent runs it again
        second = running_pid(cluster, "sleeper", not_pid=first)

        agent = json.loads(local.state_file.read_text())["pids"]["node-agent"]
        os.kill(agent, signal.SIGKILL)  # a crashed agent must not leave its pod processes running
        wait_for(lambda: not processes.is_alive(second), 30, "the pod process to die with the node agent")
        local.down()
        assert processes.marked_pids(local.dir) == []
    finally:
        cluster.close()
        local.down(purge=True)
    assert not local.dir.exists()


def test_a_failed_start_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path / "broken", ClusterConfig(nodes=1, device_resource="not a resource name",
                                                           die_with_parent=True))
    with pytest.raises(ClusterStartError) as failure:
        local.up(timeout=120)
    message = str(failure.value)
    assert "node-agent" in message and "node-agent.log" in message
    assert "not a resource name" in message  # the apiserver's rejection, from the agent's log tail
    assert "hack.localkube down" in message  # says what to do next
    assert processes.marked_pids(local.dir) == []


def test_missing_binaries_point_to_make_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPTO_CACHE_DIR", str(tmp_path / "empty-cache"))
    local = LocalCluster(tmp_path / "no-tools", ClusterConfig(nodes=1, die_with_parent=True))
    with pytest.raises(MissingToolError, match="make tools"):
        local.up(timeout=60)
    assert processes.marked_pids(local.dir) == []  # etcd, started first, was stopped again
