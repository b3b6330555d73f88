"""LocalCluster.restart_component: a control-plane component is stopped and started again with its state, and
the rest of the cluster (node agent watches, controllers) carries on."""

from __future__ import annotations

import pytest

from hack.localkube import processes
from tests.support.cluster import Cluster
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster


def test_restart_apiserver_keeps_state_and_the_node_agent_reconnects(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "before", "-n", namespace, "--from-literal=k=v")
    old_pid = cluster.local._load_state()["pids"]["kube-apiserver"]

    down_for = cluster.local.restart_component("kube-apiserver", downtime=1.0)

    assert down_for >= 1.0
    new_pid = cluster.local._load_state()["pids"]["kube-apiserver"]
    assert new_pid != old_pid and not processes.is_alive(old_pid) and processes.is_alive(new_pid)
    assert cluster.local.is_running()
    assert cluster.kubectl("get", "configmap", "before", "-n", namespace, "-o", "jsonpath={.data.k}").stdout == "v"
    # A pod created after the restart is run: the node agent's watch reconnected to the new apiserver.
    cluster.kubectl("run", "after", "-n", namespace, "--image=none", "--restart=Never", "--command", "--",
                    "python", "-c", "import time; time.sleep(60)")
    wait_for(lambda: cluster.kubectl("get", "pod", "after", "-n", namespace, "-o",
                                     "jsonpath={.status.phase}").stdout == "Running", 60, "pod after to run")
    with pytest.raises(ValueError, match="restartable"):
        cluster.local.restart_component("node-agent")
