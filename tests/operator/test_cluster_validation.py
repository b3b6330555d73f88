"""Bad input on the real cluster: the webhook rejects the corpus at apply time, the reconciler flags what gets
through without it, and the operator runs with nothing more than operator/rbac.yaml grants."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.clusterkit import (
    OperatorProcess,
    bind_operator_rbac,
    condition,
    engine_pods,
    events,
    get_resource,
    kubectl_apply,
    resource,
)
from tests.operator.corpus import load_corpus, minimal
from tests.support.common import free_port, wait_for

pytestmark = pytest.mark.cluster
CORPUS = load_corpus()


def test_a_minimal_resource_gets_the_defaults_from_the_crd(cluster: Any, namespace: str, kube: Any, crd: str) -> None:
    kubectl_apply(cluster, namespace, minimal("small"))  # name, model, tensorParallelSize only; no operator here
    spec = get_resource(kube, namespace, "small")["spec"]
    assert spec["replicas"] == 1 and spec["parallel"]["pipelineParallelSize"] == 1
    assert spec["parallel"]["expertParallel"] == {"enabled": False, "placement": "linear", "all2allBackend": "default"}
    # devices.resourceName/perNode, engine.image, gateway.image/routing/serviceType are the operator's defaults
    # (--default-*, tests/operator/test_cluster_defaults.py): the CRD leaves them unset
    assert spec["devices"] == {}
    assert spec["model"]["mountPath"] == "/models" and spec["model"]["moe"] is False
    assert "image" not in spec["engine"] and spec["engine"]["dtype"] == "auto"
    assert spec["engine"]["enablePrefixCaching"] is True and spec["engine"]["startupTimeoutSeconds"] == 1800
    assert spec["gateway"] == {"enabled": True, "replicas": 1}
    assert spec["rollout"] == {"maxUnavailable": 1, "maxSurge": 0} and spec["drain"] == {"timeoutSeconds": 600}
    scaled = cluster.kubectl("scale", "pps", "small", "-n", namespace, "--replicas=3")
    assert "scaled" in scaled.stdout and get_resource(kube, namespace, "small")["spec"]["replicas"] == 3


def test_webhook_rejects_every_invalid_resource_at_apply_time(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess]) -> None:
    config = f"pps-validate-{namespace}"
    op = start_operator("--webhook-mode", "url", "--webhook-listen", "127.0.0.1", "--webhook-port", str(free_port()),
                        "--webhook-config-name", config, "--webhook-failure-policy", "Fail")
    try:
        # Server-side dry run: a probe stored before the webhook is registered would make every later apply an
        # unchanged-spec update, which the webhook always allows (the wait could then never see a denial).
        probe = next(c for c in CORPUS if c.stage == "webhook")
        wait_for(lambda: "denied the request" in kubectl_apply(cluster, namespace, probe.body, check=False,
                                                               dry_run=True).stderr,
                 30, "the webhook to be registered and serving")
        for case in CORPUS:
            result = kubectl_apply(cluster, namespace, case.body, check=False)
            assert result.returncode != 0, f"{case.name} was accepted"
            if case.stage == "webhook":
                assert "denied the request" in result.stderr and case.expect in result.stderr, (case.name,
                                                                                                result.stderr)
            else:  # rejected by the CRD's OpenAPI schema before the webhook is asked
                assert case.field.rsplit(".", 1)[-1] in result.stderr, (case.name, result.stderr)
        assert cluster.kubectl("get", "pps", "-n", namespace, "-o", "name").stdout.strip() == ""

        # valid objects pass; a spec change that breaks one is rejected; metadata-only updates are allowed
        good = minimal("good", replicas=0)
        kubectl_apply(cluster, namespace, good)
        broken = copy.deepcopy(good)
        broken["spec"]["parallel"] = {"tensorParallelSize": 3}
        broken["spec"]["devices"] = {**broken["spec"].get("devices", {}), "perNode": 2}
        result = kubectl_apply(cluster, namespace, broken, check=False)
        assert result.returncode != 0 and "3 devices do not split evenly into 2 pods" in result.stderr
        cluster.kubectl("label", "pps", "good", "-n", namespace, "team=serving")
        assert op.healthy()
    finally:
        op.stop()
        gone = cluster.kubectl("get", "validatingwebhookconfiguration", config, check=False)
        cluster.kubectl("delete", "validatingwebhookconfiguration", config, "--ignore-not-found")
    assert gone.returncode != 0, "url-mode webhook registration must be removed on a clean shutdown"


def test_without_the_webhook_the_reconciler_flags_invalid_resources(
        cluster: Any, namespace: str, kube: Any, operator: OperatorProcess) -> None:
    cases = [c for c in CORPUS if c.stage == "webhook"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input="---\n".join(yaml.safe_dump(c.body) for c in cases))

    for case in cases:
        def flagged(case: Any = case) -> dict[str, Any] | None:
            body = get_resource(kube, namespace, case.name)
            return body if (body.get("status") or {}).get("phase") == "Invalid" else None

        body = wait_for(flagged, 60, f"{case.name} phase Invalid")
        valid = condition(body, "SpecValid")  # type: ignore[arg-type]
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert case.expect in valid["message"], (case.name, valid["message"])
        assert engine_pods(kube, namespace, case.name) == []
        assert any(e["reason"] == "InvalidSpec" for e in events(kube, namespace, case.name)), case.name

    # fixing the spec makes it valid (replicas 0: no engine needed)
    cluster.kubectl("patch", "pps", "bad-data-parallel-group", "-n", namespace, "--type=merge",  # one DP rank
                    "-p", '{"spec":{"replicas":0,"parallel":{"dataParallelSize":1}}}')
    wait_for(lambda: condition(get_resource(kube, namespace, "bad-data-parallel-group"), "SpecValid").get("status")
             == "True", 60, "SpecValid=True after the fix")
    assert operator.healthy()  # nothing crashed the operator


def token_kubeconfig(cluster: Any, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``namespace/account`` with its token."""
    def token() -> str | None:
        secrets = cluster.kubectl("get", "sa", account, "-n", namespace, "-o", "jsonpath={.secrets[0].name}").stdout
        if not secrets:
            return None
        data = cluster.kubectl("get", "secret", secrets, "-n", namespace, "-o", "jsonpath={.data.token}").stdout
        return base64.b64decode(data).decode() if data else None

    value = wait_for(token, 60, f"a token for {namespace}/{account}")
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "op",
              "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
              "users": [{"name": "op", "user": {"token": value}}],
              "contexts": [{"name": "op", "context": {"cluster": "c", "user": "op", "namespace": namespace}}]}
    path.write_text(yaml.safe_dump(config))
    return path


def test_operator_runs_with_only_the_rbac_file_permissions(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess],
        model_volume: dict[str, Any], tmp_path: Path) -> None:
    cluster.kubectl("create", "serviceaccount", "operator", "-n", namespace)
    made = bind_operator_rbac(cluster, namespace, "operator")  # the Lease "op-lease" of OperatorProcess
    try:
        kubeconfig = token_kubeconfig(cluster, namespace, "operator", tmp_path / "operator.kubeconfig")
        op = start_operator("--kubeconfig", str(kubeconfig))
        # the engine pod cannot schedule (no node has the label): creation, status and events still happen
        body = resource("rbac", model_volume, replicas=1, gateway={"enabled": True, "replicas": 0},
                        engine={"nodeSelector": {"pypto.test/nowhere": "true"}})
        kubectl_apply(cluster, namespace, body)
        wait_for(lambda: (get_resource(kube, namespace, "rbac").get("status") or {}).get("phase") == "Degraded", 60,
                 f"phase Degraded; operator log:\n{op.log_tail()}")
        assert [p["metadata"]["name"] for p in engine_pods(kube, namespace, "rbac")] == ["rbac-dp-0"]
        for kind in ("deployment", "service", "serviceaccount", "role", "rolebinding"):
            cluster.kubectl("get", kind, "rbac-gateway", "-n", namespace)
        assert any(e["reason"] == "CreatedReplica" for e in events(kube, namespace, "rbac"))
        cluster.kubectl("scale", "pps", "rbac", "-n", namespace, "--replicas=0")
        wait_for(lambda: engine_pods(kube, namespace, "rbac") == [], 60, "the replica drained and deleted")
        cluster.kubectl("patch", "pps", "rbac", "-n", namespace, "--type=merge",
                        "-p", '{"spec":{"gateway":{"enabled":false}}}')
        wait_for(lambda: cluster.kubectl("get", "deployment", "rbac-gateway", "-n", namespace, check=False).returncode
                 != 0, 60, "the gateway removed once disabled")
        log = op.log_tail(400)
        assert "403" not in log and "forbidden" not in log.lower(), log
    finally:
        for kind, name in made:
            cluster.kubectl("delete", kind, name, "--ignore-not-found")


def test_webhook_registration_keeps_helms_metadata_and_other_webhooks(
        cluster: Any, namespace: str, kube: Any, start_operator: Callable[..., OperatorProcess]) -> None:
    """helm owns the configuration in the chart's url mode (so `helm uninstall` removes it): the operator only merges
    its webhook in, and on a clean shutdown takes only that webhook out again."""
    from pypto_serving.operator import webhook as wh

    config, port = f"pps-helm-{namespace}", free_port()
    labels = {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "pypto-serving",
              "app.kubernetes.io/instance": "rel", "helm.sh/chart": "pypto-serving-0.1.0"}
    annotations = {"meta.helm.sh/release-name": "rel", "meta.helm.sh/release-namespace": namespace}
    foreign = {"name": "other.example.com", "clientConfig": {"url": "https://127.0.0.1:1/never"},
               "rules": [{"apiGroups": ["example.com"], "apiVersions": ["v1"], "operations": ["CREATE"],
                          "resources": ["widgets"], "scope": "*"}],
               "failurePolicy": "Ignore", "sideEffects": "None", "admissionReviewVersions": ["v1"]}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": config, "labels": labels, "annotations": annotations}, "webhooks": [foreign]}))
    op = start_operator("--webhook-mode", "url", "--webhook-listen", "127.0.0.1", "--webhook-port", str(port),
                        "--webhook-config-name", config)
    try:
        # Server-side dry run: a probe stored before the webhook is registered would make every later apply an
        # unchanged-spec update, which the webhook always allows (the wait could then never see a denial).
        probe = next(c for c in CORPUS if c.stage == "webhook")
        wait_for(lambda: "denied the request" in kubectl_apply(cluster, namespace, probe.body, check=False,
                                                               dry_run=True).stderr,
                 30, "the operator's webhook to be merged into the configuration and serving")
        stored = kube.get(wh.VWC_API, wh.VWC_KIND, config)
        assert labels.items() <= stored["metadata"]["labels"].items()
        assert annotations.items() <= stored["metadata"]["annotations"].items()
        assert [h["name"] for h in stored["webhooks"]] == ["other.example.com", wh.WEBHOOK_NAME]
        assert stored["webhooks"][0]["clientConfig"] == foreign["clientConfig"]
        mine = stored["webhooks"][1]["clientConfig"]
        assert mine["url"] == f"https://127.0.0.1:{port}/validate-pyptoserving" and mine["caBundle"]
        assert op.stop() == 0
        after = kube.get(wh.VWC_API, wh.VWC_KIND, config)
        assert after is not None, "the operator deleted a configuration helm owns"
        assert labels.items() <= after["metadata"]["labels"].items()
        assert annotations.items() <= after["metadata"]["annotations"].items()
        assert [h["name"] for h in after["webhooks"]] == ["other.example.com"]
    finally:
        op.stop()
        cluster.kubectl("delete", "validatingwebhookconfiguration", config, "--ignore-not-found")
