"""The helm chart: lint, values schema, what each mode renders, drift against the operator, server-side dry run.

The chart's CRD and ClusterRole are copies of crds/ and operator/rbac.yaml (`make chart-sync`), and its webhook
objects and operator flags must match what `pypto-serving operator` expects: these tests compare the rendered
output with the operator's own code so the two cannot drift apart. The real install/upgrade/uninstall runs in
tests/e2e/test_demo.py.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

import pytest
import yaml
from cryptography import x509

from pypto_serving.operator import cli as operator_cli
from pypto_serving.operator import desired
from pypto_serving.operator import types as t
from pypto_serving.operator import webhook as wh
from pypto_serving.operator.defaults import OperatorDefaults
from pypto_serving.operator.validation import check_defaults
from tests.helm.chartkit import (
    CHART,
    find,
    helm,
    kinds,
    operator_container,
    render,
    secret_data,
    template_text,
)
from tests.support.common import REPO_ROOT

LIST_MODE = {"operator.watch.allNamespaces": False, "operator.watch.namespaces": ["team-a", "team-b"]}


def operator_args(docs: list[dict[str, Any]], pod_ip: str = "10.1.2.3") -> Any:
    """The rendered operator flags parsed by the operator's own command line (unknown flags fail here)."""
    container = operator_container(docs)
    assert container["command"] == ["pypto-serving", "operator"]
    args = [a.replace("$(POD_IP)", pod_ip) for a in container["args"]]
    return operator_cli.parser().parse_args(args)


def test_helm_lint_strict() -> None:
    out = helm("lint", "--strict", CHART).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_chart_crd_is_the_generated_crd() -> None:
    source = (REPO_ROOT / "crds" / "pyptoservings.serving.pypto.io.yaml").read_text()
    copy = (CHART / "crds" / "pyptoservings.serving.pypto.io.yaml").read_text()
    assert copy == source, "helm/pypto-serving/crds/ differs from crds/: run `make chart-sync`"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["pyptoservings.serving.pypto.io.yaml"]


def rbac_docs() -> list[dict[str, Any]]:
    """operator/rbac.yaml: the watched-namespace ClusterRole, the own-namespace Role, the webhook ClusterRole."""
    return list(yaml.safe_load_all((REPO_ROOT / "operator" / "rbac.yaml").read_text()))


def named(rules: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """``rules`` with every resourceNames replaced by ``[name]`` (the release's object names)."""
    return [{**r, "resourceNames": [name]} if "resourceNames" in r else r for r in rules]


def test_chart_rbac_is_operator_rbac() -> None:
    source = (REPO_ROOT / "operator" / "rbac.yaml").read_text()
    assert (CHART / "files" / "operator-rbac.yaml").read_text() == source, \
        "helm/pypto-serving/files/operator-rbac.yaml differs from operator/rbac.yaml: run `make chart-sync`"
    namespaced, own, hook = rbac_docs()
    assert [d["kind"] for d in (namespaced, own, hook)] == ["ClusterRole", "Role", "ClusterRole"]
    docs = render()
    assert find(docs, "ClusterRole", "pps-pypto-serving-operator")["rules"] == namespaced["rules"]
    assert find(docs, "Role", "pps-pypto-serving-operator-self", "pypto-system")["rules"] == named(
        own["rules"], "pps-pypto-serving-operator")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-webhook") and d["kind"].startswith("Cluster")]
    url = render({"webhook.mode": "url"})  # the operator merges its webhook in only in url mode
    assert find(url, "ClusterRole", "pps-pypto-serving-operator-webhook")["rules"] == named(
        hook["rules"], "pps-pypto-serving-operator")


def test_rbac_reads_no_secret_and_touches_no_webhook_configuration_but_its_own() -> None:
    """The security review's findings: no Secret read, changed or deleted (the chart owns the webhook's and the
    control key's and mounts them); Secrets only created (each resource's control Secret); no webhook
    configuration but its own, by name."""
    for doc in rbac_docs():
        for rule in doc["rules"]:
            if "secrets" in rule["resources"]:
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["create"], rule
            if "validatingwebhookconfigurations" in rule["resources"]:
                assert rule["resourceNames"] and set(rule["verbs"]) <= {"get", "update", "delete"}, rule
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
    for values in ({}, LIST_MODE, {"webhook.mode": "url"}):
        for doc in render(values):
            for rule in doc.get("rules") or []:
                if "validatingwebhookconfigurations" in rule["resources"]:
                    assert rule.get("resourceNames"), (values, doc["kind"], rule)
                if "secrets" in rule["resources"]:
                    assert rule["verbs"] == ["create"], (values, doc["kind"], rule)
    # no leader election: no Lease rule, so no own-namespace Role
    url = render({"webhook.mode": "url", "operator.leaderElection.enabled": False, "operator.replicas": 1})
    assert not [d for d in url if d["kind"] == "Role"]


def test_default_render_is_service_mode_watching_all_namespaces() -> None:
    docs = render()
    assert kinds(docs) == [
        ("ClusterRole", "pps-pypto-serving-operator", None),
        ("ClusterRoleBinding", "pps-pypto-serving-operator", None),
        ("Deployment", "pps-pypto-serving-operator", "pypto-system"),
        ("PodDisruptionBudget", "pps-pypto-serving-operator", "pypto-system"),
        ("Role", "pps-pypto-serving-operator-self", "pypto-system"),
        ("RoleBinding", "pps-pypto-serving-operator-self", "pypto-system"),
        ("Secret", "pps-pypto-serving-control-key", "pypto-system"),
        ("Secret", "pps-pypto-serving-webhook-tls", "pypto-system"),
        ("Service", "pps-pypto-serving-operator-metrics", "pypto-system"),
        ("Service", "pps-pypto-serving-webhook", "pypto-system"),
        ("ServiceAccount", "pps-pypto-serving-operator", "pypto-system"),
        ("ValidatingWebhookConfiguration", "pps-pypto-serving-operator", None),
    ]
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert find(docs, "PodDisruptionBudget")["apiVersion"] == "policy/v1beta1"  # 1.20 has no policy/v1
    args = operator_args(docs)
    assert args.all_namespaces and args.leader_elect
    assert args.leader_election_id == "pps-pypto-serving-operator"
    assert (args.webhook_mode, args.webhook_listen, args.health_host) == ("service", "10.1.2.3", "10.1.2.3")
    binding = find(docs, "ClusterRoleBinding", "pps-pypto-serving-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pps-pypto-serving-operator",
                                    "namespace": "pypto-system"}]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "pps-pypto-serving-operator"


def test_operator_pods_are_locked_down_and_match_the_engines_network_policy() -> None:
    docs = render()
    pod = find(docs, "Deployment")["spec"]["template"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    # the only writable path is the scratch emptyDir (TMPDIR); service mode mounts the chart's certificate
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TMPDIR"] == mounts["scratch"]["mountPath"]
    assert operator_args(docs).webhook_cert_dir == mounts["webhook-tls"]["mountPath"]
    assert mounts["webhook-tls"]["readOnly"] is True
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"scratch", "webhook-tls", "control-key"}
    # the control key (engine drain tokens derive from it): the chart's Secret, mounted read-only, >= 32 bytes
    key_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "control-key")
    assert mounts["control-key"]["readOnly"] is True
    assert operator_args(docs).control_key_file == mounts["control-key"]["mountPath"] + "/key"
    key = secret_data(find(docs, "Secret", key_volume["secret"]["secretName"]), "key")
    assert len(key) >= 32 and key != secret_data(find(render(), "Secret", key_volume["secret"]["secretName"]), "key")
    # the engines' NetworkPolicy admits the operator's pods by these labels (operator/desired.py)
    assert desired.OPERATOR_POD_LABELS.items() <= pod["metadata"]["labels"].items()
    assert {p["name"] for p in container["ports"]} == {"health", "webhook"}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert container["resources"]["limits"]["memory"]


def test_service_mode_the_chart_owns_the_webhook_certificate_and_registration() -> None:
    docs = render()
    args = operator_args(docs)
    pod = find(docs, "Deployment")["spec"]["template"]
    (tls,) = [v for v in pod["spec"]["volumes"] if v["name"] == "webhook-tls"]
    secret = find(docs, "Secret", tls["secret"]["secretName"])
    (config,) = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    (hook,) = config["webhooks"]
    service = find(docs, "Service", hook["clientConfig"]["service"]["name"])
    ca = secret_data(secret, "ca.crt")
    # the chart's configuration is the operator's webhook (rules, policies) behind the Service, trusting its CA
    expected = wh.configuration(config["metadata"]["name"], {}, args.webhook_failure_policy)["webhooks"][0]
    assert {k: v for k, v in hook.items() if k != "clientConfig"} == {
        k: v for k, v in expected.items() if k != "clientConfig"}
    assert hook["clientConfig"]["service"]["path"] == f"/{wh.HANDLER_ID}"
    assert hook["clientConfig"]["service"]["port"] == args.webhook_port
    assert secret_data({"data": {"c": hook["clientConfig"]["caBundle"]}}, "c") == ca
    # the Service reaches the operator pods' webhook port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == args.webhook_port
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"
    # the mounted certificate names the Service and chains to the caBundle; the operator only serves it
    bundle = wh.TLSBundle(ca, secret_data(secret, "tls.crt"), secret_data(secret, "tls.key"))
    svc, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert wh.covers(bundle, [f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"])
    cert = x509.load_pem_x509_certificate(bundle.cert)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    assert args.webhook_mode == "service" and args.webhook_cert_dir


def test_url_mode_leaves_the_webhooks_to_the_operator() -> None:
    docs = render({"webhook.mode": "url"})
    args = operator_args(docs)
    assert args.webhook_mode == "url" and args.webhook_host is None
    config = find(docs, "ValidatingWebhookConfiguration", args.webhook_config_name)
    assert "webhooks" not in config  # helm owns the object (uninstall deletes it); each operator pod fills it in
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["pps-pypto-serving-control-key"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Service"] == ["pps-pypto-serving-operator-metrics"]


def test_webhook_off() -> None:
    docs = render({"webhook.enabled": False, "metrics.service.enabled": False})
    assert operator_args(docs).webhook_mode == "none"
    assert not [d for d in docs if d["kind"] in ("ValidatingWebhookConfiguration", "Service")]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["pps-pypto-serving-control-key"]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == ["pps-pypto-serving-operator"]
    assert "webhook" not in {p["name"] for p in operator_container(docs)["ports"]}


def test_namespace_list_uses_roles_only() -> None:
    docs = render(LIST_MODE)
    args = operator_args(docs)
    assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces
    namespaced = rbac_docs()[0]
    for ns in ("team-a", "team-b"):
        assert find(docs, "Role", "pps-pypto-serving-operator", ns)["rules"] == namespaced["rules"]
        binding = find(docs, "RoleBinding", "pps-pypto-serving-operator", namespace=ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "pps-pypto-serving-operator"}
    # own namespace: only the Lease; nothing cluster-wide in service mode (the chart owns the configuration)
    own = find(docs, "Role", "pps-pypto-serving-operator-self", "pypto-system")
    assert {r for rule in own["rules"] for r in rule["resources"]} == {"leases"}
    assert find(docs, "RoleBinding", "pps-pypto-serving-operator-self", "pypto-system")["roleRef"]["kind"] == "Role"
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    # url mode: cluster-wide only the one webhook configuration, by name
    url = render({**LIST_MODE, "webhook.mode": "url"})
    assert [d["metadata"]["name"] for d in url if d["kind"] == "ClusterRole"] == ["pps-pypto-serving-operator-webhook"]
    bindings = [d for d in url if d["kind"] == "ClusterRoleBinding"]
    assert [b["roleRef"]["name"] for b in bindings] == ["pps-pypto-serving-operator-webhook"]
    # watching its own namespace too: a Role there for the watched rules and the -self Role, side by side
    docs = render({**LIST_MODE, "operator.watch.namespaces": ["pypto-system"]})
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Role") == [
        "pps-pypto-serving-operator", "pps-pypto-serving-operator-self"]


def test_single_replica_without_leader_election() -> None:
    docs = render({"operator.replicas": 1, "operator.leaderElection.enabled": False,
                   "operator.logLevel": "DEBUG", "operator.extraArgs": ["--workers=2"]})
    args = operator_args(docs)
    assert not args.leader_elect and args.log_level == "DEBUG" and args.workers == 2
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize(("values", "complaint"), [
    ({"operator.replicas": 0}, "replicas"),
    ({"operator.logLevel": "LOUD"}, "logLevel"),
    ({"webhook.mode": "magic"}, "mode"),
    ({"webhook.failurePolicy": "Maybe"}, "failurePolicy"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"operator.watch.allNamespaces": False}, "namespaces"),
    ({"operator.watch.namespaces": ["Not_A_Namespace"]}, "namespaces"),
    ({"serving.deviceResourceName": "Ascend910"}, "deviceResourceName"),
    ({"serving.gateway.routing": "random"}, "routing"),
    ({"operater": {"replicas": 1}}, "operater"),
    ({"operator.workers": "four"}, "workers"),
    ({"security.allowedHostPaths": ["relative/path"]}, "allowedHostPaths"),
    ({"security.extraAllowedHostPaths": ["/a,/b"]}, "extraAllowedHostPaths"),
    ({"security.allowedCapabilities": ["sys admin"]}, "allowedCapabilities"),
    ({"serving.engine.cpuLimit": "lots"}, "cpuLimit"),
])
def test_values_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    result = template_text(values, check=False)
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr and complaint in result.stderr, \
        result.stderr


def test_values_schema_enums_follow_the_operator() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    serving = schema["properties"]["serving"]["properties"]
    assert tuple(serving["gateway"]["properties"]["routing"]["enum"]) == t.ROUTING_POLICIES
    assert tuple(serving["gateway"]["properties"]["serviceType"]["enum"]) == t.SERVICE_TYPES
    levels = next(a for a in operator_cli.parser()._actions if a.dest == "log_level").choices
    assert schema["properties"]["operator"]["properties"]["logLevel"]["enum"] == list(levels)
    pattern = re.compile(serving["deviceResourceName"]["pattern"])
    assert pattern.match(t.DEFAULT_DEVICE_RESOURCE) and pattern.match("huawei.com/ascend-1980")


def test_serving_values_become_the_operators_defaults() -> None:
    """values.yaml serving.* reach the operator as --default-* flags (parsed by its own CLI) and are valid there."""
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())["serving"]
    defaults = operator_cli.operator_defaults(operator_args(render()))
    assert defaults == OperatorDefaults(
        engine_image=chart_values["engineImage"], gateway_image=chart_values["gatewayImage"],
        device_resource_name=chart_values["deviceResourceName"], devices_per_node=chart_values["devicesPerNode"],
        routing=chart_values["gateway"]["routing"], gateway_service_type=chart_values["gateway"]["serviceType"],
        engine_cpu_request=chart_values["engine"]["cpuRequest"], engine_cpu_limit=chart_values["engine"]["cpuLimit"])
    assert check_defaults(defaults) == []
    custom = {"serving.engineImage": "registry.local:5000/pypto-serving:0.1.0-cann", "serving.gatewayImage": None,
              "serving.deviceResourceName": "huawei.com/ascend-1980", "serving.devicesPerNode": None,
              "serving.gateway.routing": "prefix-aware", "serving.gateway.serviceType": "NodePort"}
    assert operator_cli.operator_defaults(operator_args(render(custom))) == OperatorDefaults(
        engine_image="registry.local:5000/pypto-serving:0.1.0-cann", gateway_image=None,
        device_resource_name="huawei.com/ascend-1980", devices_per_node=None, routing="prefix-aware",
        gateway_service_type="NodePort", engine_cpu_request="2", engine_cpu_limit="32")


def test_notes_tell_what_to_do_next() -> None:
    out = helm("install", "pps", CHART, "--namespace", "pypto-system", "--dry-run=client",
               *[a for kv in LIST_MODE.items() for a in ("--set-json", f"{kv[0]}={json.dumps(kv[1])}")]).stdout
    notes = out.split("NOTES:", 1)[1]
    for text in ("watching namespaces: team-a, team-b", "Lease pypto-system/pps-pypto-serving-operator",
                 "kubectl apply -n team-a", "kubectl scale pps my-model --replicas=3", "/replicas",
                 "logs deploy/pps-pypto-serving-operator"):
        assert text in notes, notes
    # the manifest NOTES prints is a valid PyptoServing
    manifest = notes.split("<<'YAML'\n", 1)[1].split("   YAML", 1)[0]
    from pypto_serving.operator.validation import validate

    _, problems = validate(yaml.safe_load(textwrap.dedent(manifest)))
    assert not problems


@pytest.mark.cluster
@pytest.mark.parametrize("values", [
    {},
    {"webhook.mode": "url", "operator.replicas": 1},
    {"webhook.enabled": False, "rbac.create": True, "serviceAccount.name": "custom"},
], ids=["service-mode-all-namespaces", "url-mode-one-namespace", "no-webhook"])
def test_rendered_chart_passes_a_server_side_dry_run(cluster: Any, namespace: str, values: dict[str, Any]) -> None:
    if values.get("webhook.mode") == "url":
        values = {**values, "operator.watch.allNamespaces": False, "operator.watch.namespaces": [namespace]}
    text = template_text(values, namespace, "dry", "--include-crds").stdout
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text)
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert len(applied) == len(docs), result.stdout
    assert any(line.startswith("deployment.apps/dry-pypto-serving-operator") for line in applied)


def test_security_values_become_the_operators_policy() -> None:
    """security.* reach the operator as its policy flags; the defaults are the operator's built-in ones."""
    from pypto_serving.operator import security

    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tuple(chart_values["security"]["allowedHostPaths"]) == security.DEFAULT_ALLOWED_HOST_PATHS
    defaults = operator_cli.operator_defaults(operator_args(render()))
    assert (defaults.engine_cpu_request, defaults.engine_cpu_limit) == ("2", "32")
    assert defaults.allowed_host_paths == security.DEFAULT_ALLOWED_HOST_PATHS
    assert defaults.allowed_capabilities == () and defaults.allow_root_engines is False
    custom = operator_cli.operator_defaults(operator_args(render({
        "security.extraAllowedHostPaths": ["/srv/llm"], "security.allowedCapabilities": ["IPC_LOCK"],
        "security.allowRootEngines": True, "serving.engine.cpuLimit": None, "serving.engine.cpuRequest": "500m"})))
    assert custom.allowed_host_paths == (*security.DEFAULT_ALLOWED_HOST_PATHS, "/srv/llm")
    assert custom.allowed_capabilities == ("IPC_LOCK",) and custom.allow_root_engines is True
    assert (custom.engine_cpu_request, custom.engine_cpu_limit) == ("500m", None)
    assert check_defaults(custom) == []
    narrowed = operator_cli.operator_defaults(operator_args(render({"security.allowedHostPaths": ["/models"]})))
    assert narrowed.allowed_host_paths == ("/models",)
