"""Kubernetes Events from the node agent (source component "kubelet"), so `kubectl describe pod` tells the story.

Repeats of the same event (same pod, reason and message) within ten minutes bump the existing event's count,
as client-go's event recorder does, instead of creating new objects.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from hack.localkube.kubeclient import KubeClient
from hack.localkube.node.nodes import now_rfc3339

AGGREGATE_SECONDS = 600.0


class EventRecorder:
    """Posts events about pods; never raises (events are best effort, as in the kubelet)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str, str, str], tuple[str, int, float]] = {}  # key -> (name, count, when)

    def emit(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal",
             field_path: str | None = None) -> None:
        """Record one event on ``pod``."""
        meta = pod["metadata"]
        namespace = meta["namespace"]
        stamp = now_rfc3339()
        key = (meta["uid"], reason, message, field_path or "")
        with self._lock:
            recent = self._recent.get(key)
            if len(self._recent) > 5000:
                self._recent.clear()
        try:
            if recent and time.monotonic() - recent[2] < AGGREGATE_SECONDS:
                name, count = recent[0], recent[1] + 1
                patched = self.client.merge_patch(f"/api/v1/namespaces/{namespace}/events/{name}",
                                                  {"count": count, "lastTimestamp": stamp}, ok_missing=True)
                if patched is not None:
                    with self._lock:
                        self._recent[key] = (name, count, time.monotonic())
                    return
            involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": namespace,
                        "uid": meta["uid"], "resourceVersion": meta.get("resourceVersion", "")}
            if field_path:
                involved["fieldPath"] = field_path
            name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
            self.client.create(f"/api/v1/namespaces/{namespace}/events", {
                "apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": namespace},
                "involvedObject": involved, "reason": reason, "message": message, "type": kind,
                "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1, "reportingComponent": "kubelet",
            })
            with self._lock:
                self._recent[key] = (name, 1, time.monotonic())
        except Exception as exc:  # namespace terminating, apiserver busy: drop it
            print(f"{time.strftime('%H:%M:%S')} event {reason} for {meta['name']} not recorded: {exc}", flush=True)
