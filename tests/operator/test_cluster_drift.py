"""On the real local cluster: the objects a PyptoServing owns are applied server-side on every reconcile, so a
hand edit of any of them is reverted within one resync, while a field we do not set survives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.clusterkit import OperatorProcess, kubectl_apply, resource
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster

RESYNC = 10  # the test operator's --resync-seconds (clusterkit)
# (kind, object, JSONPath of a field we own, a JSON patch that breaks it)
EDITS = [
    ("deployment", "drift-gateway", "{.spec.replicas}", [{"op": "replace", "path": "/spec/replicas", "value": 3}]),
    ("service", "drift-gateway", "{.spec.selector}", [{"op": "replace", "value": "other",
                                                       "path": "/spec/selector/app.kubernetes.io~1component"}]),
    ("service", "drift-engines", "{.spec.ports[*].name}", [{"op": "remove", "path": "/spec/ports/0"}]),
    ("networkpolicy", "drift-engines", "{.spec.ingress[0].ports[*].port}",
     [{"op": "replace", "path": "/spec/ingress/0/ports/0/port", "value": 1}]),
    ("role", "drift-gateway", "{.rules[*].resources}", [{"op": "replace", "path": "/rules", "value": []}]),
    ("rolebinding", "drift-gateway", "{.subjects[*].name}",
     [{"op": "replace", "path": "/subjects/0/name", "value": "someone-else"}]),
]


def test_hand_edits_of_owned_objects_are_reverted_within_a_resync(
        cluster: Any, namespace: str, operator: OperatorProcess, model_volume: dict[str, Any]) -> None:
    body = resource("drift", model_volume, replicas=0, gateway={"enabled": True, "replicas": 1},
                    networkPolicy={"enabled": True})
    kubectl_apply(cluster, namespace, body)

    def field(kind: str, name: str, path: str) -> str | None:
        got = cluster.kubectl("get", kind, name, "-n", namespace, "-o", f"jsonpath={path}", check=False)
        return got.stdout if got.returncode == 0 and got.stdout else None

    wanted = {}
    for kind, name, path, _ in EDITS:
        wanted[kind, name] = wait_for(lambda k=kind, n=name, p=path: field(k, n, p), 120, f"{kind} {name}")
    # a label a user adds is not ours: server-side apply leaves it
    cluster.kubectl("label", "service", "drift-gateway", "-n", namespace, "team=search")

    for kind, name, path, patch in EDITS:
        # the object as stored right after the edit (the operator may revert it a moment later)
        edited = cluster.kubectl("patch", kind, name, "-n", namespace, "--type=json", "-p", json.dumps(patch),
                                 "-o", f"jsonpath={path}").stdout
        assert edited != wanted[kind, name], f"the edit of {kind} {name} did not take"
    for kind, name, path, _ in EDITS:
        wait_for(lambda k=kind, n=name, p=path: field(k, n, p) == wanted[k, n], RESYNC + 10,
                 f"{kind} {name} {path} restored to {wanted[kind, name]!r}")
    assert field("service", "drift-gateway", "{.metadata.labels.team}") == "search"
    managers = cluster.kubectl("get", "service", "drift-gateway", "-n", namespace, "-o",
                               "jsonpath={.metadata.managedFields[*].manager}").stdout.split()
    assert "pypto-serving-operator" in managers
    assert "serving.pypto.io/applied-hash" not in cluster.kubectl(
        "get", "deployment", "drift-gateway", "-n", namespace, "-o", "jsonpath={.metadata.annotations}").stdout
