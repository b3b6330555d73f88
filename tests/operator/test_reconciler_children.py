"""The reconciler applies the engines' NetworkPolicy with the other children and removes it when disabled;
the operator's listeners default to loopback (or the pod IP), never all interfaces."""

from __future__ import annotations

from typing import Any

import pytest

from pypto_serving.operator import cli
from pypto_serving.operator.metrics import Metrics
from pypto_serving.operator.reconciler import Reconciler
from tests.operator.corpus import minimal


class FakeActuator:
    """Records what a reconcile applies and deletes (no pods, no engines)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.applied: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        self.events: list[str] = []

    def get_resource(self, namespace: str, name: str) -> dict[str, Any]:
        return self.body

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []

    def fetch_loads(self, pods: Any) -> dict[str, Any]:
        return {}

    def create_pods(self, manifests: list[dict[str, Any]]) -> list[bool]:
        return [True for _ in manifests]

    def apply(self, obj: dict[str, Any], owner_uid: str) -> str:
        self.applied.append(obj)
        return "created"

    def delete_gateway(self, namespace: str, name: str, owner_uid: str) -> int:
        return 0

    def delete_owned(self, namespace: str, name: str, kinds: Any, owner_uid: str) -> int:
        self.deleted.append((namespace, name, tuple(kinds)))
        return 1

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str, now: float) -> None:
        self.events.append(reason)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        pass


def resource(**spec: Any) -> dict[str, Any]:
    body = minimal(**spec)
    body["metadata"].update({"namespace": "ns1", "uid": "uid-1", "generation": 1})
    return body


def test_reconcile_applies_the_network_policy() -> None:
    act = FakeActuator(resource(replicas=1))
    Reconciler(act, Metrics()).reconcile("ns1", "demo")  # type: ignore[arg-type]
    policies = [o for o in act.applied if o["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["name"] for p in policies] == ["demo-engines"]
    assert policies[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert act.deleted == []


def test_reconcile_deletes_the_network_policy_when_disabled() -> None:
    act = FakeActuator(resource(replicas=1, networkPolicy={"enabled": False}))
    Reconciler(act, Metrics()).reconcile("ns1", "demo")  # type: ignore[arg-type]
    assert not [o for o in act.applied if o["kind"] == "NetworkPolicy"]
    assert act.deleted == [("ns1", "demo-engines", (("networking.k8s.io/v1", "NetworkPolicy"),))]
    assert "NetworkPolicyRemoved" in act.events


def test_listeners_default_to_loopback_or_the_pod_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    args = cli.parser().parse_args([])
    assert args.health_host == "127.0.0.1" and args.webhook_listen == "127.0.0.1"
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    args = cli.parser().parse_args([])
    assert args.health_host == "10.1.2.3" and args.webhook_listen == "10.1.2.3"
