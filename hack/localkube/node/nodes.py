"""Node objects: registration with capacity (cpu, memory, pods, devices), Ready status and Lease heartbeats."""

from __future__ import annotations

import datetime
import platform
import threading
import traceback
from typing import Any

from hack.localkube.kubeclient import ApiError, KubeClient
from hack.localkube.node.config import AgentConfig

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
STATUS_REFRESH_SECONDS = 60
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
KUBELET_VERSION = "v1.20.2"


def now_rfc3339() -> str:
    """Current UTC time as Kubernetes' RFC 3339 seconds timestamp."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """Current UTC time as a Kubernetes MicroTime (used by Leases and events)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeManager:
    """Registers this agent's nodes and keeps them Ready until ``stop`` is set."""

    def __init__(self, client: KubeClient, config: AgentConfig, node_ips: dict[str, str]) -> None:
        self.client = client
        self.config = config
        self.node_ips = node_ips
        self._transition = now_rfc3339()

    def _labels(self, name: str) -> dict[str, str]:
        device_type = self.config.device_resource.split("/")[-1]
        return {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "localkube", "accelerator": f"huawei-{device_type}",
                "localkube.pypto.io/node": "true"}

    def _status(self, name: str) -> dict[str, Any]:
        c = self.config
        resources = {"cpu": c.node_cpu, "memory": c.node_memory, "pods": str(c.node_pods),
                     "ephemeral-storage": "100Gi", c.device_resource: str(c.devices_per_node)}
        beat = now_rfc3339()

        def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": beat, "lastTransitionTime": self._transition}

        return {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "localkube node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.node_ips[name]},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": c.kubelet_port}},
            "nodeInfo": {"machineID": name, "systemUUID": name, "bootID": c.boot_id or self._transition,
                         "kernelVersion": platform.release(), "osImage": "localkube (host processes)",
                         "containerRuntimeVersion": "localkube://0.1", "kubeletVersion": KUBELET_VERSION,
                         "kubeProxyVersion": KUBELET_VERSION, "operatingSystem": "linux", "architecture": "amd64"},
        }

    def register(self) -> None:
        """Create or update every node, drop not-ready taints and post a Ready status; delete local nodes left
        from an earlier start with more nodes (nothing would run their pods)."""
        listed = self.client.get("/api/v1/nodes", labelSelector="localkube.pypto.io/node=true") or {}
        for node in listed.get("items", []):
            if node["metadata"]["name"] not in self.config.node_names:
                self.client.delete(f"/api/v1/nodes/{node['metadata']['name']}")
        for name in self.config.node_names:
            existing = self.client.get(f"/api/v1/nodes/{name}", ok_missing=True)
            if existing is None:
                try:
                    self.client.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                         "metadata": {"name": name, "labels": self._labels(name)},
                                                         "spec": {}})
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                existing = self.client.get(f"/api/v1/nodes/{name}") or {}
            taints = [t for t in existing.get("spec", {}).get("taints") or [] if t["key"] not in NOT_READY_TAINTS]
            self.client.merge_patch(f"/api/v1/nodes/{name}", {
                "metadata": {"labels": self._labels(name)},
                "spec": {"taints": taints or None, "unschedulable": existing.get("spec", {}).get("unschedulable")},
            })
            self.post_status(name)
            self.renew_lease(name, existing.get("metadata", {}).get("uid"))

    def post_status(self, name: str) -> None:
        """Write the node's status (capacity, conditions with a fresh heartbeat)."""
        self.client.merge_patch(f"/api/v1/nodes/{name}/status", {"status": self._status(name)})

    def renew_lease(self, name: str, node_uid: str | None = None) -> None:
        """Create or renew the node's Lease in kube-node-lease."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
        if self.client.merge_patch(path, {"spec": spec}, ok_missing=True) is not None:
            return
        if node_uid is None:
            node_uid = (self.client.get(f"/api/v1/nodes/{name}") or {})["metadata"]["uid"]
        owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}
        self.client.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [owner]}, "spec": spec})

    def heartbeat_loop(self, stop: threading.Event) -> None:
        """Renew Leases every 10 s and refresh node status every 60 s (re-registering a node that was deleted)."""
        beats = 0
        while not stop.wait(LEASE_RENEW_SECONDS):
            beats += 1
            for name in self.config.node_names:
                try:
                    if self.client.get(f"/api/v1/nodes/{name}", ok_missing=True) is None:
                        self.register()
                    self.renew_lease(name)
                    if beats % (STATUS_REFRESH_SECONDS // LEASE_RENEW_SECONDS) == 0:
                        self.post_status(name)
                except Exception:
                    print(f"heartbeat for node {name} failed (will retry):\n{traceback.format_exc()}", flush=True)
