"""The node agent's settings (written as JSON by ``LocalCluster`` and read by ``python -m hack.localkube.node``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from hack.localkube.kubeclient import Credentials


@dataclass(kw_only=True)
class NodeShape:
    """The local nodes (count, capacity, device plugin resource) and the kubelet's restart back-off: set on the
    cluster's config, handed to the node agent through its own."""

    nodes: int = 2
    devices_per_node: int = 8
    device_resource: str = "huawei.com/Ascend910"
    node_cpu: str = "32"
    node_memory: str = "128Gi"
    node_pods: int = 110
    node_name_prefix: str = "local-node"
    restart_backoff_base: float = 10.0  # kubelet's CrashLoopBackOff: 10s doubling ...
    restart_backoff_max: float = 300.0  # ... up to 5 minutes

    def node_shape(self) -> dict[str, object]:
        """These fields as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(NodeShape)}


@dataclass(kw_only=True)
class AgentConfig(NodeShape):
    """Everything the node agent needs to know."""

    cluster_dir: str
    server: str
    ca_file: str
    cert_file: str
    key_file: str
    kubelet_cert_file: str
    kubelet_key_file: str
    kubelet_port: int
    path_prefix: str = ""
    image_paths: list[str] = field(default_factory=list)  # the pods' "image": kept visible under any volume
    env_prefixes: list[str] = field(default_factory=list)
    boot_id: str = ""  # reported as the nodes' nodeInfo.bootID, so `up` can tell this start's nodes from stale ones

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read a JSON config file (unknown keys are ignored)."""
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    @property
    def credentials(self) -> Credentials:
        """How the agent authenticates to the apiserver."""
        return Credentials(self.server, Path(self.ca_file), Path(self.cert_file), Path(self.key_file))

    @property
    def node_names(self) -> list[str]:
        """Names of the nodes this agent runs: ``<prefix>-1`` ... ``<prefix>-N``."""
        return [f"{self.node_name_prefix}-{index}" for index in range(1, self.nodes + 1)]

    @property
    def dir(self) -> Path:
        """The cluster directory."""
        return Path(self.cluster_dir)
