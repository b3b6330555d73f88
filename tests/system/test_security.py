"""Security of the deployed system, checked on the real cluster: least-privilege ServiceAccounts
(`kubectl auth can-i`), the engines' NetworkPolicy, the gateway's API key, the pods' security contexts."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
import yaml

from benchmarks.chaos_system import ENGINE_SELECTOR, System
from tests.support.cluster import Cluster
from tests.support.common import REPO_ROOT

pytestmark = pytest.mark.cluster

# Rules every authenticated identity has (system:basic-user, system:discovery, system:public-info-viewer).
DEFAULT_RESOURCES = {"selfsubjectaccessreviews.authorization.k8s.io", "selfsubjectrulesreviews.authorization.k8s.io"}
ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def can_i_list(cluster: Cluster, account: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` of a ServiceAccount in a namespace: resource -> verbs (defaults removed)."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={account}", "-n", namespace).stdout
    rights: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        match = ROW.match(line)
        assert match, f"unparsed can-i row: {line!r}"
        resource, _urls, names, verbs = match.groups()
        if not resource or resource in DEFAULT_RESOURCES:
            continue
        assert names == "", f"{resource} limited to names {names}"
        rights.setdefault(resource, set()).update(verbs.split())
    return rights


def can_i(cluster: Cluster, account: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={account}"] + ([f"--subresource={sub}"] if sub else [])
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def expected_rights(rules: list[dict[str, Any]]) -> dict[str, set[str]]:
    """resource[.group] -> verbs, as can-i prints them."""
    out: dict[str, set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                kind, _, sub = resource.partition("/")  # can-i prints "pyptoservings.serving.pypto.io/status"
                name = (f"{kind}.{group}" if group else kind) + (f"/{sub}" if sub else "")
                out.setdefault(name, set()).update(rule["verbs"])
    return out


def test_operator_service_account_can_do_only_what_it_needs(cluster: Cluster, namespace: str, crd: str) -> None:
    # the ClusterRole of the watched namespaces (the Lease, Secret and webhook rules, by name, are checked in
    # tests/operator/test_cluster_rbac.py)
    role = next(yaml.safe_load_all((REPO_ROOT / "operator" / "rbac.yaml").read_text()))
    role["metadata"]["name"] = f"pypto-operator-cani-{uuid.uuid4().hex[:6]}"
    account = f"system:serviceaccount:{namespace}:operator"
    cluster.kubectl("create", "serviceaccount", "operator", "-n", namespace)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(role))
    try:
        cluster.kubectl("create", "rolebinding", "operator", "-n", namespace,
                        f"--clusterrole={role['metadata']['name']}",
                        f"--serviceaccount={namespace}:operator")
        rights = can_i_list(cluster, account, namespace)
        # Exactly the rules of operator/rbac.yaml: nothing more (e.g. no list of secrets, no pods/exec).
        assert rights == expected_rights(role["rules"])
        # What it needs, checked through the authorizer (not only listed) ...
        for verb, resource in [("create", "pods"), ("patch", "pods"), ("delete", "pods"), ("watch", "pods"),
                               ("patch", "pyptoservings.serving.pypto.io/status"),
                               ("create", "networkpolicies.networking.k8s.io"), ("create", "deployments.apps"),
                               ("create", "events")]:
            assert can_i(cluster, account, verb, resource, namespace), f"cannot {verb} {resource}"
        # ... and what it must not do.
        for verb, resource, ns in [
            ("update", "pyptoservings.serving.pypto.io", namespace), ("delete", "pyptoservings.serving.pypto.io",
                                                                       namespace),
            ("list", "secrets", namespace), ("create", "pods/exec", namespace), ("get", "secrets", "kube-system"),
            ("create", "pods", "default"), ("delete", "nodes", None), ("create", "clusterrolebindings", None),
            ("escalate", "roles", namespace), ("bind", "clusterroles", None), ("impersonate", "serviceaccounts", None),
            ("*", "*", namespace), ("create", "persistentvolumes", None), ("patch", "nodes", None),
        ]:
            assert not can_i(cluster, account, verb, resource, ns), f"the operator may {verb} {resource} in {ns}"
    finally:
        cluster.kubectl("delete", "clusterrole", role["metadata"]["name"], "--ignore-not-found")


def test_gateway_service_account_only_reads_pods(cluster: Cluster, serving_system: System) -> None:
    ns = serving_system.namespace
    account = f"system:serviceaccount:{ns}:{serving_system.name}-gateway"
    assert can_i_list(cluster, account, ns) == {"pods": {"get", "list", "watch"}}
    assert not can_i(cluster, account, "get", "secrets", ns)
    assert not can_i(cluster, account, "list", "pods", "kube-system")


def selected(system: System, match_labels: dict[str, str]) -> set[str]:
    selector = ",".join(f"{k}={v}" for k, v in match_labels.items())
    return {p["metadata"]["name"] for p in system.pods(selector) if not p["metadata"].get("deletionTimestamp")}


def test_network_policy_admits_only_the_gateway_and_the_operator(serving_system: System) -> None:
    system = serving_system
    policy = system.kube.get("networking.k8s.io/v1", "NetworkPolicy", f"{system.name}-engines", system.namespace)
    assert policy is not None
    assert policy["metadata"]["ownerReferences"][0]["name"] == system.name
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    engines = {p["metadata"]["name"] for p in system.pods(ENGINE_SELECTOR.format(name=system.name))
               if not p["metadata"].get("deletionTimestamp")}
    gateways = {p["metadata"]["name"] for p in system.gateway_pods()}
    assert engines and gateways
    assert selected(system, spec["podSelector"]["matchLabels"]) == engines  # it applies to exactly the engines
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    gateway_peer, operator_peer = rule["from"]
    assert set(gateway_peer) == {"podSelector"}  # same namespace only
    assert selected(system, gateway_peer["podSelector"]["matchLabels"]) == gateways
    assert not engines & selected(system, gateway_peer["podSelector"]["matchLabels"])
    # the operator only from its own namespace (here the system's), by the namespace's name label
    assert operator_peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": system.namespace}},
                             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pypto-serving",
                                                             "app.kubernetes.io/component": "operator"}}}


def test_gateway_enforces_the_api_key(serving_system: System) -> None:
    (target,) = serving_system.gateway_targets()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    missing = httpx.post(f"{target}/v1/completions", json=body, timeout=30)
    wrong = httpx.post(f"{target}/v1/completions", json=body, timeout=30, headers={"Authorization": "Bearer nope"})
    models = httpx.get(f"{target}/v1/models", timeout=30)
    assert (missing.status_code, wrong.status_code, models.status_code) == (401, 401, 401)
    assert missing.json()["error"]["message"]
    good = httpx.post(f"{target}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {serving_system.api_key}"})
    assert good.status_code == 200, good.text
    assert httpx.get(f"{target}/health", timeout=10).status_code == 200  # probes stay open


def test_pod_security_contexts(serving_system: System) -> None:
    (gateway,) = serving_system.gateway_pods()
    assert gateway["spec"]["securityContext"]["runAsNonRoot"] is True
    assert gateway["spec"]["securityContext"]["runAsUser"] != 0
    container = gateway["spec"]["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    for engine in serving_system.engine_pods():
        assert engine["spec"]["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                                       "capabilities": {"drop": ["ALL"]}}
        assert engine["spec"]["securityContext"] == {"runAsNonRoot": True,
                                                     "seccompProfile": {"type": "RuntimeDefault"}}
        assert engine["spec"]["automountServiceAccountToken"] is False
        # no token was mounted (the ServiceAccount admission plugin honours the pod's setting)
        assert not any("serviceaccount" in m["mountPath"] for m in engine["spec"]["containers"][0].get(
            "volumeMounts", []))
    assert gateway["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1Gi"
