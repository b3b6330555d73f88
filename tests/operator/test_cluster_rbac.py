"""The operator's RBAC as the chart renders it, checked by the real apiserver's authorizer (`kubectl auth can-i
--as=system:serviceaccount:...` and impersonated requests): it cannot read, change or delete any Secret (it may
only create one: each resource's control Secret), in any namespace, and cannot create, update or delete a webhook
configuration other than its own."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml

from tests.helm.chartkit import render

pytestmark = pytest.mark.cluster
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def can_i(cluster: Any, account: str, verb: str, target: str, namespace: str | None) -> bool:
    """`kubectl auth can-i VERB TARGET --as=ACCOUNT` in ``namespace`` (None: cluster-scoped or all namespaces)."""
    scope = ["-n", namespace] if namespace else ["--all-namespaces"]
    result = cluster.kubectl("auth", "can-i", verb, target, f"--as={account}", *scope, check=False)
    return result.stdout.strip() == "yes"


def install_chart_rbac(cluster: Any, namespace: str, values: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """Apply the chart's ServiceAccount and RBAC for a release in ``namespace``; returns (account, release
    prefix, the cluster-scoped objects to delete)."""
    release = f"rbac{uuid.uuid4().hex[:6]}"
    docs = [d for d in render(values, namespace, release) if d["kind"] in RBAC_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    account = f"system:serviceaccount:{namespace}:{release}-pypto-serving-operator"
    return account, f"{release}-pypto-serving", [d for d in docs if d["kind"].startswith("Cluster")]


@pytest.mark.parametrize("mode", ["namespace-list", "all-namespaces"])
def test_operator_cannot_read_other_secrets_or_touch_other_webhook_configurations(
        cluster: Any, namespace: str, crd: str, mode: str) -> None:
    other = cluster.create_namespace("rbac-other")
    unrelated = f"unrelated-{uuid.uuid4().hex[:6]}"
    values: dict[str, Any] = {"operator.watch.allNamespaces": True} if mode == "all-namespaces" else {
        "operator.watch.allNamespaces": False, "operator.watch.namespaces": [namespace]}
    account, prefix, cluster_scoped = install_chart_rbac(cluster, namespace, values)
    try:
        cluster.kubectl("create", "secret", "generic", "db-password", "-n", other, "--from-literal=p=hunter2")
        cluster.kubectl("create", "secret", "generic", "neighbour", "-n", namespace, "--from-literal=p=x")
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": unrelated}, "webhooks": []}))
        own_secret, own_config = f"{prefix}-webhook-tls", f"{prefix}-operator"
        # What it needs (service-mode webhook, leader election): its Lease. The chart owns the webhook's Secret
        # (mounted) and configuration, so the operator may touch neither.
        for verb, target, ns in [("update", f"leases.coordination.k8s.io/{own_config}", namespace),
                                 ("create", "leases.coordination.k8s.io", namespace),
                                 ("create", "pods", namespace), ("watch", "pyptoservings.serving.pypto.io",
                                                                 namespace),
                                 ("create", "secrets", namespace)]:  # the control Secrets, never read back
            assert can_i(cluster, account, verb, target, ns), f"the operator cannot {verb} {target} in {ns}"
        # What the review found and must stay impossible.
        for verb, target, ns in [
            ("get", "secret/db-password", other), ("list", "secrets", other), ("get", "secrets", None),
            ("list", "secrets", None), ("watch", "secrets", namespace), ("get", "secret/neighbour", namespace),
            ("list", "secrets", namespace), ("get", f"secret/{own_secret}", namespace),
            ("delete", f"secret/{own_secret}", namespace), ("get", "secret/demo-control", namespace),
            ("patch", "secret/demo-control", namespace), ("update", "secret/demo-control", namespace),
            ("delete", "secret/demo-control", namespace), ("patch", "secret/neighbour", namespace),
            ("update", f"validatingwebhookconfigurations/{own_config}", None),
            ("delete", f"validatingwebhookconfigurations/{unrelated}", None),
            ("update", f"validatingwebhookconfigurations/{unrelated}", None),
            ("patch", f"validatingwebhookconfigurations/{unrelated}", None),
            ("create", "validatingwebhookconfigurations", None), ("list", "validatingwebhookconfigurations", None),
            ("create", "mutatingwebhookconfigurations", None), ("update", "leases.coordination.k8s.io/other",
                                                                 namespace),
        ]:
            assert not can_i(cluster, account, verb, target, ns), f"the operator may {verb} {target} in {ns}"
        if mode == "namespace-list":  # Roles only: nothing outside the watched namespace
            assert not can_i(cluster, account, "create", "pods", other)
            assert not can_i(cluster, account, "create", "secrets", other)
            assert not can_i(cluster, account, "list", "pyptoservings.serving.pypto.io", None)
        # The same through real requests (impersonated): the authorizer refuses them.
        for args in (("get", "secret", "db-password", "-n", other), ("get", "secret", "neighbour", "-n", namespace),
                     ("delete", "validatingwebhookconfiguration", unrelated)):
            result = cluster.kubectl(*args, f"--as={account}", check=False)
            assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (args, result.stderr)
        assert cluster.kubectl("get", "validatingwebhookconfiguration", unrelated, check=False).returncode == 0
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", unrelated, "--ignore-not-found")
        for doc in cluster_scoped:
            cluster.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found")
        cluster.delete_namespace(other)
