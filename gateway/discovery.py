"""Replica discovery: a static endpoint list, or a Kubernetes list+watch of engine pods by label selector.

The Kubernetes discovery is the product's one list+watch helper (``pypto_serving.kube.ListWatch``, lightkube;
credentials from the in-cluster ServiceAccount, else KUBECONFIG): it lists the pods, applies the list as the
whole replica set, then watches from the list's resourceVersion. A 410 Gone re-lists at once; any other failure
reconnects with exponential back-off. Every event is applied as it arrives, so a pod labelled draining stops
receiving new requests with that one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from pypto_serving.contract import (
    ENGINE_PORT,
    ENGINE_PORT_NAME,
    ENV_POD_NAMESPACE,
    L_DRAINING,
    L_GROUP_READY,
    L_GROUP_SIZE,
    L_INSTANCE,
    L_RANK,
    L_SERVES,
)
from pypto_serving.gateway.client import check_url
from pypto_serving.gateway.replicas import Registry
from pypto_serving.kube import ListWatch, equality_labels, load_config

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Discovery:
    """Keeps a registry's replica set current."""

    async def start(self, registry: Registry) -> None:
        """Fill ``registry`` and keep it current until ``stop``."""

    async def stop(self) -> None:
        """Stop updating."""


class StaticDiscovery(Discovery):
    """A fixed list of engine base URLs (each replica is named by its URL)."""

    def __init__(self, endpoints: list[str]) -> None:
        """ValueError names an endpoint that is not an http(s) URL."""
        self.endpoints = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        for url in self.endpoints:
            check_url(url)

    async def start(self, registry: Registry) -> None:
        registry.replace((url, url, "ready") for url in self.endpoints)


def pod_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_entry(pod: dict[str, Any], default_port: int = ENGINE_PORT) -> tuple[str, str, str] | None:
    """(name, url, state) of an engine pod, or None while it has no IP or does not serve (a worker of a multi-pod
    serving group). State is ``ready`` (eligible: Ready, Running, not terminating, not labelled draining, and
    in a multi-pod group, the group labelled Ready by the operator), ``draining``, ``terminating`` or
    ``not-ready``."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or labels.get(L_SERVES, "true").lower() == "false":
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == ENGINE_PORT_NAME and p.get("containerPort"):
                port = int(p["containerPort"])
    ready = pod_ready(pod)
    if meta.get("deletionTimestamp"):
        state = "terminating"
    elif labels.get(L_DRAINING, "").lower() == "true":
        state = "draining"
    elif not ready or status.get("phase") != "Running" or labels.get(L_GROUP_READY, "true").lower() != "true":
        state = "not-ready"
    else:
        state = "ready"
    host = f"[{ip}]" if ":" in ip else ip
    return meta.get("name", ip), f"http://{host}:{port}", state


def group_of(pod: dict[str, Any]) -> tuple[str, str, int] | None:
    """(resource, group index, pods in the group) of a pod of a multi-pod serving group, else None."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        size = int(labels.get(L_GROUP_SIZE, "1"))
    except ValueError:
        return None
    return (labels.get(L_INSTANCE, ""), labels.get(L_RANK, ""), size) if size > 1 else None


def member_up(pod: dict[str, Any]) -> bool:
    """A group member that can take part in its group's steps: Running, Ready and not terminating."""
    running = (pod.get("status") or {}).get("phase") == "Running"
    return pod_ready(pod) and running and not (pod.get("metadata") or {}).get("deletionTimestamp")


class GroupMembers:
    """The pods of each multi-pod serving group, as watched: a group's serving pods are routable only while all of
    its pods are there, Running, Ready and not terminating. The operator's ``group-ready`` label says the same, one
    reconcile later; checking the members here stops traffic to a broken group on the watch event itself."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def clear(self) -> None:
        self._groups.clear()

    def update(self, kind: str, pod: dict[str, Any]) -> list[dict[str, Any]]:
        """Record one pod event; returns the group's pods now (empty for a pod of no multi-pod group)."""
        group = group_of(pod)
        if group is None:
            return []
        members = self._groups.setdefault(group[:2], {})
        name = (pod.get("metadata") or {}).get("name", "")
        if kind == "DELETED":
            members.pop(name, None)
        else:
            members[name] = pod
        return list(members.values())

    def intact(self, pod: dict[str, Any]) -> bool:
        """Every pod of ``pod``'s group is there and up (True for a pod of no multi-pod group)."""
        group = group_of(pod)
        if group is None:
            return True
        members = self._groups.get(group[:2], {})
        return len(members) >= group[2] and all(member_up(p) for p in members.values())


class KubernetesDiscovery(Discovery):
    """List+watch of the pods matching ``selector`` in ``namespace`` (pypto_serving.kube.ListWatch)."""

    def __init__(self, namespace: str | None, selector: str, kubeconfig: str | None = None,
                 default_port: int = ENGINE_PORT, watch_timeout_s: int = 300, max_backoff_s: float = 30.0) -> None:
        self.namespace = namespace or default_namespace()
        self.labels = equality_labels(selector)  # ValueError names a term that is not key=value
        self.kubeconfig = kubeconfig
        self.default_port = default_port
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self.events = 0  # watch events applied (for tests and /replicas debugging)
        self.groups = GroupMembers()
        self._watch: ListWatch | None = None

    @property
    def synced(self) -> asyncio.Event:
        """Set once the first list is in the registry."""
        assert self._watch is not None, "start() first"
        return self._watch.synced

    async def start(self, registry: Registry) -> None:
        config = await asyncio.to_thread(load_config, self.kubeconfig)

        def listed(pods: Iterable[dict[str, Any]]) -> None:
            pods = list(pods)
            self.groups.clear()
            for p in pods:
                self.groups.update("ADDED", p)
            registry.replace(e for e in (self.entry(p) for p in pods) if e)

        self._watch = ListWatch(config, "v1", "Pod", self.namespace, self.labels, listed,
                                lambda kind, pod: self.apply(registry, kind, pod), self.watch_timeout_s,
                                self.max_backoff_s)
        self._watch.start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._watch.synced.wait(), timeout=10)  # serve after the first list when possible

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()

    def entry(self, pod: dict[str, Any]) -> tuple[str, str, str] | None:
        """`pod_entry`, not ready while a pod of its multi-pod group is missing or down."""
        entry = pod_entry(pod, self.default_port)
        if entry is not None and entry[2] == "ready" and not self.groups.intact(pod):
            return entry[0], entry[1], "not-ready"
        return entry

    def apply(self, registry: Registry, kind: str, pod: dict[str, Any]) -> None:
        """Apply one watch event to the registry (and to the other serving pods of the pod's group)."""
        self.events += 1
        name = (pod.get("metadata") or {}).get("name")
        members = self.groups.update(kind, pod)
        entry = self.entry(pod)
        if kind == "DELETED" or entry is None:
            if name:
                registry.remove(name)
        else:
            registry.upsert(*entry)
        for member in members:  # a worker going down takes its group's serving pods out with it
            if (member.get("metadata") or {}).get("name") != name and (other := self.entry(member)) is not None:
                registry.upsert(*other)


def default_namespace() -> str:
    """The pod's own namespace ($POD_NAMESPACE or the ServiceAccount file), else ``default``."""
    if os.environ.get(ENV_POD_NAMESPACE):
        return os.environ[ENV_POD_NAMESPACE]
    with contextlib.suppress(OSError), open(SA_NAMESPACE_FILE) as f:
        return f.read().strip()
    return "default"
