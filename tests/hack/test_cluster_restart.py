"""LocalCluster.restart_component: a control-plane component is stopped and started again with its state, and
the rest of the cluster (node agent watches, controllers) carries on.

It uses its own one-node cluster so that the restart cannot disturb the session cluster's other tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack.localkube import ClusterConfig, LocalCluster, processes
from tests.support.cluster import Cluster
from tests.support.common import wait_for


def test_restart_apiserver_keeps_state_and_the_node_agent_reconnects(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path / "cluster", ClusterConfig(nodes=1, devices_per_node=2, die_with_parent=True))
    cluster = Cluster(local)
    try:
        local.up()
        cluster.kubectl("create", "configmap", "before", "--from-literal=k=v")
        old_pid = local._load_state()["pids"]["kube-apiserver"]

        down_for = local.restart_component("kube-apiserver", downtime=1.0)

        assert down_for >= 1.0
        new_pid = local._load_state()["pids"]["kube-apiserver"]
        assert new_pid != old_pid and not processes.is_alive(old_pid) and processes.is_alive(new_pid)
        assert local.is_running()
        assert cluster.kubectl("get", "configmap", "before", "-o", "jsonpath={.data.k}").stdout == "v"
        # A pod created after the restart is run: the node agent's watch reconnected to the new apiserver.
        cluster.kubectl("run", "after", "--image=none", "--restart=Never", "--command", "--",
                        "python", "-c", "import time; time.sleep(60)")
        wait_for(lambda: cluster.kubectl("get", "pod", "after", "-o", "jsonpath={.status.phase}").stdout == "Running",
                 60, "pod after to run")
        with pytest.raises(ValueError, match="restartable"):
            local.restart_component("node-agent")
    finally:
        cluster.close()
        local.down(purge=True)
