"""Pod -> replica mapping of the Kubernetes discovery (pure logic; the watch itself runs on the real cluster)."""

from __future__ import annotations

import asyncio

from pypto_serving.gateway.discovery import KubernetesDiscovery, StaticDiscovery, pod_entry
from pypto_serving.gateway.replicas import Registry


def pod(name: str = "demo-dp-0", ip: str | None = "127.0.1.5", ready: bool = True, draining: bool = False,
        deleting: bool = False, phase: str = "Running", port: int | None = 8000) -> dict:
    labels = {"app.kubernetes.io/component": "engine"}
    if draining:
        labels["serving.pypto.io/draining"] = "true"
    meta: dict = {"name": name, "labels": labels, "resourceVersion": "7"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ports = [{"name": "http", "containerPort": port}] if port else []
    return {"metadata": meta, "spec": {"containers": [{"name": "engine", "ports": ports}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_pod_entry_eligibility() -> None:
    assert pod_entry(pod()) == ("demo-dp-0", "http://127.0.1.5:8000", "ready")
    assert pod_entry(pod(port=9000))[1] == "http://127.0.1.5:9000"
    assert pod_entry(pod(port=None), default_port=8123)[1] == "http://127.0.1.5:8123"
    assert pod_entry(pod(ip=None)) is None
    assert pod_entry(pod(ip="fd00::1"))[1] == "http://[fd00::1]:8000"
    assert pod_entry(pod(ready=False))[2] == "not-ready"
    assert pod_entry(pod(phase="Pending"))[2] == "not-ready"
    assert pod_entry(pod(draining=True))[2] == "draining"
    assert pod_entry(pod(draining=True, deleting=True))[2] == "terminating"


def test_watch_events_update_the_registry_one_event_at_a_time() -> None:
    registry = Registry()
    discovery = KubernetesDiscovery("ns", "app=x")
    discovery.apply(registry, "ADDED", pod("a", "127.0.1.1"))
    discovery.apply(registry, "ADDED", pod("b", "127.0.1.2"))
    assert [r.name for r in registry.eligible()] == ["a", "b"]
    discovery.apply(registry, "MODIFIED", pod("a", "127.0.1.1", draining=True))  # one event stops traffic
    assert [r.name for r in registry.eligible()] == ["b"] and registry.get("a").state() == "draining"
    discovery.apply(registry, "DELETED", pod("b", "127.0.1.2"))
    assert registry.names() == ["a"]
    discovery.apply(registry, "MODIFIED", pod("a", None))  # lost its IP
    assert registry.names() == []


def test_static_discovery_names_replicas_by_url() -> None:
    registry = Registry()
    asyncio.run(StaticDiscovery(["http://127.0.0.1:1/", " http://127.0.0.1:2", ""]).start(registry))
    assert registry.names() == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
