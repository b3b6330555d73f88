"""The reconciler applies the engines' NetworkPolicy with the other children and removes it when disabled, and
creates the control Secret before the pods that mount it; the operator's listeners default to loopback (or the
pod IP), never all interfaces."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from pypto_serving.operator import cli
from pypto_serving.operator.control import engine_token
from pypto_serving.operator.metrics import Metrics
from pypto_serving.operator.reconciler import Reconciler
from tests.operator.corpus import minimal

KEY = b"k" * 32


class FakeActuator:
    """Records what a reconcile applies and deletes (no pods, no engines)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.applied: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        self.events: list[str] = []
        self.calls: list[str] = []  # create_control_secret and create_pods, in order
        self.secrets: list[dict[str, Any]] = []

    def get_resource(self, namespace: str, name: str) -> dict[str, Any]:
        return self.body

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []

    def fetch_loads(self, pods: Any) -> dict[str, Any]:
        return {}

    def create_pods(self, manifests: list[dict[str, Any]]) -> list[bool]:
        self.calls += ["create_pods"] if manifests else []
        return [True for _ in manifests]

    def create_control_secret(self, manifest: dict[str, Any]) -> bool:
        self.calls.append("create_control_secret")
        self.secrets.append(manifest)
        return True

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


def reconciler(act: FakeActuator) -> Reconciler:
    return Reconciler(act, Metrics(), operator_namespace="ops", control_key=KEY)  # type: ignore[arg-type]


def test_reconcile_applies_the_network_policy() -> None:
    act = FakeActuator(resource(replicas=1))
    reconciler(act).reconcile("ns1", "demo")
    policies = [o for o in act.applied if o["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["name"] for p in policies] == ["demo-engines"]
    assert policies[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    operator_peer = policies[0]["spec"]["ingress"][0]["from"][1]
    assert operator_peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}
    assert act.deleted == []


def test_the_control_secret_is_created_before_the_pods_that_mount_it() -> None:
    act = FakeActuator(resource(replicas=2))
    reconciler(act).reconcile("ns1", "demo")
    assert act.calls == ["create_control_secret", "create_pods"]
    (secret,) = act.secrets
    assert secret["metadata"]["name"] == "demo-control" and secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert base64.b64decode(secret["data"]["token"]).decode() == engine_token(KEY, "ns1", "demo")
    assert not [o for o in act.applied if o["kind"] == "Secret"]  # created once, never applied (no patch on Secrets)
    act = FakeActuator(resource(replicas=0))
    reconciler(act).reconcile("ns1", "demo")
    assert act.calls == []  # no pod to create: no Secret call either


def test_reconcile_deletes_the_network_policy_when_disabled() -> None:
    act = FakeActuator(resource(replicas=1, networkPolicy={"enabled": False}))
    reconciler(act).reconcile("ns1", "demo")
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
