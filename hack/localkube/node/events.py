"""Kubernetes Events from the node agent (source component "kubelet"), so `kubectl describe pod` tells the story."""

from __future__ import annotations

import time
import uuid
from typing import Any

from hack.localkube.kubeclient import KubeClient
from hack.localkube.node.nodes import now_rfc3339


class EventRecorder:
    """Posts events about pods; never raises (events are best effort, as in the kubelet)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    def emit(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal",
             field_path: str | None = None) -> None:
        """Record one event on ``pod``."""
        meta = pod["metadata"]
        stamp = now_rfc3339()
        involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                    "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion", "")}
        if field_path:
            involved["fieldPath"] = field_path
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": involved, "reason": reason, "message": message, "type": kind,
            "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1, "reportingComponent": "kubelet",
        }
        try:
            self.client.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except Exception as exc:  # namespace terminating, apiserver busy: drop it
            print(f"{time.strftime('%H:%M:%S')} event {reason} for {meta['name']} not recorded: {exc}", flush=True)
