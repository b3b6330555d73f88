"""Pod -> replica mapping of the Kubernetes discovery, and its list+watch protocol against a scripted pods endpoint
(pure logic; the watch against the real apiserver runs in test_kubernetes_discovery.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

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
    grouped = pod(name="demo-dp-0-0")
    grouped["metadata"]["labels"].update({"serving.pypto.io/serves": "true", "serving.pypto.io/group-ready": "false"})
    assert pod_entry(grouped)[2] == "not-ready"  # a multi-pod group that is not all Ready gets no traffic
    grouped["metadata"]["labels"]["serving.pypto.io/group-ready"] = "true"
    assert pod_entry(grouped)[2] == "ready"
    grouped["metadata"]["labels"]["serving.pypto.io/serves"] = "false"
    assert pod_entry(grouped) is None  # a worker pod is no replica
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


class ScriptedPodsApi:
    """A stand-in for the pods endpoint, answering list and watch requests from a script (pure protocol logic:
    the 410 answers are hard to provoke on demand from the real apiserver; the real list+watch is exercised in
    test_kubernetes_discovery.py)."""

    def __init__(self, lists: list[list[dict]], watches: list[str]) -> None:
        self.lists, self.watches = lists, watches  # watches: "gone-status", "gone-event" or "hold"
        self.requests: list[dict[str, str]] = []

    async def handle(self, request):  # aiohttp handler
        from aiohttp import web

        self.requests.append(dict(request.query))
        if request.query.get("watch") not in ("1", "true"):
            items = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
            version = str(10 * len(self.requests))
            return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": version}, "items": items})
        step = self.watches.pop(0) if self.watches else "hold"
        if step == "gone-status":
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired"}, status=410)
        response = web.StreamResponse()
        await response.prepare(request)
        if step == "gone-event":
            error = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
            await response.write((json.dumps(error) + "\n").encode())
            return response
        await asyncio.sleep(3600)  # "hold": an idle watch, ended by the test's shutdown
        return response


def test_a_410_gone_watch_lists_again_and_replaces_the_replica_set(tmp_path, caplog) -> None:
    """Both forms of 410 (the watch request answered 410, an ERROR event with code 410 in the stream) make the
    discovery list again and take the new list as the whole replica set, then watch from the new version."""
    from aiohttp import web

    api = ScriptedPodsApi(lists=[[pod("a", "127.0.1.1")], [pod("b", "127.0.1.2")], [pod("c", "127.0.1.3")]],
                          watches=["gone-status", "gone-event", "hold"])

    async def scenario() -> list[str]:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/ns/pods", api.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5)  # the held watch is not waited for
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "u", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        registry = Registry()
        discovery = KubernetesDiscovery("ns", "app=x", kubeconfig=str(kubeconfig), max_backoff_s=0.1)
        try:
            await discovery.start(registry)
            deadline = asyncio.get_running_loop().time() + 20
            while registry.names() != ["c"] or len(api.requests) < 6:
                assert asyncio.get_running_loop().time() < deadline, (registry.names(), api.requests)
                await asyncio.sleep(0.02)
            return registry.names()
        finally:
            await discovery.stop()
            await runner.cleanup()

    caplog.set_level("INFO", logger="pypto_serving.kube")
    assert asyncio.run(scenario()) == ["c"]
    kinds = ["watch" if q.get("watch") in ("1", "true") else "list" for q in api.requests]
    assert kinds == ["list", "watch", "list", "watch", "list", "watch"]
    assert api.requests[-1]["resourceVersion"] == "50"  # the watch resumes from the latest list's version
    assert all(q["labelSelector"] == "app=x" for q in api.requests)
    gone = [r for r in caplog.records if "resourceVersion gone" in r.getMessage()]
    assert len(gone) == 2 and not [r for r in caplog.records if r.levelname == "WARNING"]  # expected, not failures


def test_only_equality_selectors_are_accepted() -> None:
    assert KubernetesDiscovery("ns", "app=x,tier==engine").labels == {"app": "x", "tier": "engine"}
    for bad in ("app!=x", "tier in (a,b)", "app", "app=x,"):
        with pytest.raises(ValueError, match="only equality selectors"):
            KubernetesDiscovery("ns", bad)


def group_pod(name: str, index: int, serves: bool, ip: str, ready: bool = True, deleting: bool = False) -> dict:
    p = pod(name, ip, ready=ready, deleting=deleting)
    p["metadata"]["labels"].update({"app.kubernetes.io/instance": "big", "serving.pypto.io/dp-rank": "0",
                                    "serving.pypto.io/group-pod": str(index), "serving.pypto.io/group-size": "2",
                                    "serving.pypto.io/serves": str(serves).lower()})
    if serves:
        p["metadata"]["labels"]["serving.pypto.io/group-ready"] = "true"
    return p


def test_a_group_whose_worker_goes_down_stops_getting_traffic_on_that_event() -> None:
    """The operator's group-ready label lags a worker's failure by a reconcile; the gateway sees the worker's own
    watch event and takes the group's serving pod out at once, and back in when the group is whole again."""
    registry = Registry()
    discovery = KubernetesDiscovery("ns", "app=x")
    discovery.apply(registry, "ADDED", group_pod("big-dp-0-0", 0, True, "127.0.1.1"))
    assert registry.eligible() == []  # the worker is not seen yet: the group is not whole
    discovery.apply(registry, "ADDED", group_pod("big-dp-0-1", 1, False, "127.0.1.2"))
    assert [r.name for r in registry.eligible()] == ["big-dp-0-0"]  # the worker itself is no replica
    discovery.apply(registry, "MODIFIED", group_pod("big-dp-0-1", 1, False, "127.0.1.2", ready=False))
    assert registry.eligible() == [] and registry.get("big-dp-0-0").state() == "not-ready"
    discovery.apply(registry, "MODIFIED", group_pod("big-dp-0-1", 1, False, "127.0.1.2"))
    assert [r.name for r in registry.eligible()] == ["big-dp-0-0"]
    discovery.apply(registry, "MODIFIED", group_pod("big-dp-0-1", 1, False, "127.0.1.2", deleting=True))
    assert registry.eligible() == []
    discovery.apply(registry, "DELETED", group_pod("big-dp-0-1", 1, False, "127.0.1.2", deleting=True))
    assert registry.eligible() == []
