"""A real local Kubernetes 1.20 cluster without Docker: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and a node agent that runs pods as host processes on loopback addresses.

Use ``LocalCluster(dir).up()`` / ``.down()`` from Python, or ``python -m hack.localkube up|down|status --dir DIR``.
See docs/cluster.md.
"""

from hack.localkube.cluster import ClusterConfig, ClusterStartError, LocalCluster

__all__ = ["ClusterConfig", "ClusterStartError", "LocalCluster"]
