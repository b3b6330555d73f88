"""Pure desired-state functions: engine pod, Services, gateway objects and the spec hash."""

from __future__ import annotations

import base64
from typing import Any

from pypto_serving.operator import desired as d
from pypto_serving.operator.defaults import resolve
from pypto_serving.operator.types import PyptoServingSpec
from tests.operator.corpus import minimal

OWNER = d.Owner("demo", "ns1", "uid-1")


def spec_of(**overrides: Any) -> PyptoServingSpec:
    """The spec of ``minimal(**overrides)`` resolved with the operator's built-in defaults, as validate() gives it."""
    return resolve(PyptoServingSpec.model_validate(minimal(**overrides)["spec"]))


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_engine_pod_follows_the_contract() -> None:
    spec = spec_of(replicas=3, parallel={"tensorParallelSize": 4},
                   model={"name": "qwen", "path": "/models/qwen", "volume": {"hostPath": {"path": "/data/m"}}},
                   engine={"maxModelLen": 4096, "blockSize": 128, "extraArgs": ["--enforce-eager"],
                           "resources": {"requests": {"cpu": "4"}}, "shmSize": "8Gi"},
                   drain={"timeoutSeconds": 120})
    pod = d.engine_pod(OWNER, spec, 2)
    meta, pspec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-dp-2" and meta["namespace"] == "ns1"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "pypto-serving", "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": "pypto-serving-operator",
        "serving.pypto.io/dp-rank": "2", "serving.pypto.io/spec-hash": d.spec_hash(spec)}
    assert meta["ownerReferences"] == [{"apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing",
                                        "name": "demo", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    (container,) = pspec["containers"]
    assert container["command"] == ["pypto-serving", "engine"]
    assert container["args"] == ["--model", "/models/qwen", "--served-model-name", "qwen", "--host", "$(POD_IP)",
                                 "--port", "8000", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "1",
                                 "--dtype", "auto",
                                 "--max-model-len", "4096", "--block-size", "128", "--enable-prefix-caching",
                                 "--enforce-eager", "--control-token-file", "/etc/pypto-serving/control/token"]
    assert container["resources"] == {"requests": {"cpu": "4", "huawei.com/Ascend910": "4"},
                                      "limits": {"huawei.com/Ascend910": "4"}}
    env = env_map(container)
    assert "PYPTO_DP_RANK" not in env and "PYPTO_DP_SIZE" not in env  # nothing reads them: the pod name has the rank
    assert env["PYPTO_TP_SIZE"] == "4" and env["PYPTO_PP_SIZE"] == "1"
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HCCL_IF_IP"] == "$(POD_IP)"
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("HCCL_IF_IP")  # $(POD_IP) only expands if defined before
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 1800
    volumes = {v["name"]: v for v in pspec["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    assert volumes["model"] == {"name": "model", "hostPath": {"path": "/data/m"}}
    assert volumes["control-token"] == {"name": "control-token", "secret": {
        "secretName": "demo-control", "items": [{"key": "token", "path": "token"}]}}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "model": "/models", "control-token": "/etc/pypto-serving/control"}
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] in ("model", "control-token"))
    assert pspec["terminationGracePeriodSeconds"] >= 120
    assert pspec["subdomain"] == "demo-engines" and pspec["hostname"] == "demo-dp-2"
    term = pspec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == d.engine_selector("demo")


def test_the_control_secret_holds_the_token_the_engine_pods_read() -> None:
    secret = d.control_secret(OWNER, "f" * 64)
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["metadata"]["name"] == "demo-control" and secret["metadata"]["namespace"] == "ns1"
    assert secret["metadata"]["ownerReferences"] == [OWNER.reference()]  # garbage-collected with the resource
    assert base64.b64decode(secret["data"]["token"]) == b"f" * 64
    # extraArgs cannot point the engine at another token file: validation refuses the flag, and ours comes last
    (container,) = d.engine_pod(OWNER, spec_of(engine={"extraArgs": ["--control-token-file", "/tmp/t"]}), 0)[
        "spec"]["containers"]
    assert container["args"][-2:] == ["--control-token-file", "/etc/pypto-serving/control/token"]
    volume = next(v for v in d.engine_pod(OWNER, spec_of(), 0)["spec"]["volumes"] if v["name"] == "control-token")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["items"][0]["key"] in secret["data"]


def test_pipeline_parallel_pod_requests_tp_x_pp_devices_and_passes_both_flags() -> None:
    spec = spec_of(parallel={"tensorParallelSize": 2, "pipelineParallelSize": 3})
    (container,) = d.engine_pod(OWNER, spec, 0)["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--pipeline-parallel-size") + 1] == "3"
    assert container["resources"]["limits"] == {"huawei.com/Ascend910": "6"}
    assert env_map(container)["PYPTO_PP_SIZE"] == "3"


def test_ascend_scheduling_fields_and_hccn_mount() -> None:
    tolerations = [{"key": "huawei.com/Ascend910", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    spec = spec_of(devices={"resourceName": "huawei.com/ascend-1980", "hccnConfPath": "/etc/hccn.conf"},
                   parallel={"tensorParallelSize": 2, "expertParallel": {"enabled": True}},
                   model={"name": "m", "path": "/models/m", "moe": True},
                   engine={"nodeSelector": {"accelerator": "910b"}, "tolerations": tolerations, "affinity": affinity,
                           "priorityClassName": "serving-high", "enablePrefixCaching": False,
                           "env": [{"name": "HCCL_CONNECT_TIMEOUT", "value": "1200"}]})
    pod = d.engine_pod(OWNER, spec, 0)
    pspec = pod["spec"]
    (container,) = pspec["containers"]
    assert pspec["nodeSelector"] == {"accelerator": "910b"}
    assert pspec["tolerations"] == tolerations and pspec["priorityClassName"] == "serving-high"
    assert pspec["affinity"]["nodeAffinity"] == affinity["nodeAffinity"]
    assert "podAntiAffinity" in pspec["affinity"] and "podAntiAffinity" not in affinity  # user input not mutated
    assert container["resources"]["limits"] == {"huawei.com/ascend-1980": "2"}
    assert "--no-enable-prefix-caching" in container["args"]
    env = env_map(container)
    assert env["HCCL_CONNECT_TIMEOUT"] == "1200" and not [k for k in env if k.startswith("PYPTO_EP")]
    args = container["args"]
    assert args[args.index("--enable-expert-parallel") + 1:][:2] == ["--expert-placement-strategy", "linear"]
    assert "--all2all-backend" not in args  # "default": the engine's own
    hccn = [v for v in pspec["volumes"] if v["name"] == "hccn-conf"]
    assert hccn == [{"name": "hccn-conf", "hostPath": {"path": "/etc/hccn.conf", "type": "File"}}]
    assert {"name": "hccn-conf", "mountPath": "/etc/hccn.conf", "readOnly": True} in container["volumeMounts"]


def test_spec_hash_tracks_only_pod_shaping_fields() -> None:
    base = spec_of()
    assert d.spec_hash(base) == d.spec_hash(spec_of())
    for same in (spec_of(replicas=5), spec_of(gateway={"routing": "round-robin"}), spec_of(drain={"timeoutSeconds": 5}),
                 spec_of(rollout={"maxSurge": 1})):
        assert d.spec_hash(same) == d.spec_hash(base)
    for changed in (spec_of(parallel={"tensorParallelSize": 2}), spec_of(engine={"maxModelLen": 128}),
                    spec_of(model={"name": "other", "path": "/models/tiny"}),
                    spec_of(devices={"resourceName": "huawei.com/ascend-1980"})):
        assert d.spec_hash(changed) != d.spec_hash(base)


def test_engine_service_is_headless() -> None:
    svc = d.engine_service(OWNER)
    assert svc["metadata"]["name"] == "demo-engines"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == d.engine_selector("demo")
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_gateway_objects() -> None:
    spec = spec_of(gateway={"routing": "prefix-aware", "replicas": 2, "serviceType": "NodePort",
                            "apiKeySecret": {"name": "keys", "key": "token"}})
    objs = {o["kind"]: o for o in d.gateway_objects(OWNER, spec)}
    assert set(objs) == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}
    assert all(o["metadata"]["name"] == "demo-gateway" for o in objs.values())
    assert all(o["metadata"]["ownerReferences"][0]["name"] == "demo" for o in objs.values())
    assert objs["Role"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert objs["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": "demo-gateway", "namespace": "ns1"}]
    dep = objs["Deployment"]["spec"]
    assert dep["replicas"] == 2
    pod = dep["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-gateway"
    (container,) = pod["containers"]
    assert container["command"] == ["pypto-serving", "gateway"]
    assert container["args"] == ["--namespace", "ns1", "--selector",
                                 "app.kubernetes.io/instance=demo,app.kubernetes.io/component=engine",
                                 "--policy", "prefix-aware", "--host", "$(POD_IP)", "--port", "8080",
                                 "--api-key-file", "/etc/pypto-serving/api-key/token"]
    assert pod["volumes"][0]["secret"]["secretName"] == "keys"
    assert dep["selector"]["matchLabels"].items() <= dep["template"]["metadata"]["labels"].items()
    assert objs["Service"]["spec"]["type"] == "NodePort"
    assert objs["Service"]["spec"]["selector"] == d.gateway_selector("demo")
    assert d.gateway_url(OWNER) == "http://demo-gateway.ns1.svc:8080"


def test_children_depend_on_gateway_and_network_policy_enabled() -> None:
    no_gateway = d.children(OWNER, spec_of(gateway={"enabled": False}), "ops")
    assert [o["kind"] for o in no_gateway] == ["Service", "NetworkPolicy"]
    assert [o["kind"] for o in d.children(OWNER, spec_of(gateway={"enabled": False},
                                                          networkPolicy={"enabled": False}), "ops")] == ["Service"]
    assert len(d.children(OWNER, spec_of(), "ops")) == 7


def test_network_policy_admits_only_the_gateway_and_the_operator_on_the_engine_port() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}
    policy = d.network_policy(OWNER, spec_of(networkPolicy={"extraIngressFrom": [peer]}), "pypto-system")
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] == "demo-engines" and policy["metadata"]["namespace"] == "ns1"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = policy["spec"]
    # It selects exactly the engine pods (the labels every engine pod carries) and restricts only ingress.
    pod_labels = d.engine_pod(OWNER, spec_of(), 0)["metadata"]["labels"]
    assert spec["podSelector"] == {"matchLabels": d.engine_selector("demo")}
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    gateway_pod_labels = next(o for o in d.gateway_objects(OWNER, spec_of()) if o["kind"] == "Deployment")[
        "spec"]["template"]["metadata"]["labels"]
    assert rule["from"][0] == {"podSelector": {"matchLabels": d.gateway_selector("demo")}}
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()
    # the operator's pods, and only in the operator's own namespace (one peer: namespace AND pod labels)
    assert rule["from"][1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pypto-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pypto-serving",
                                        "app.kubernetes.io/component": "operator"}}}
    assert rule["from"][2] == peer and len(rule["from"]) == 3


def test_security_contexts() -> None:
    # The gateway: non-root, no privilege, read-only root filesystem.
    dep = next(o for o in d.gateway_objects(OWNER, spec_of()) if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    container = pod["containers"][0]["securityContext"]
    assert container == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}
    # Engines: no capabilities, no escalation, RuntimeDefault seccomp, non-root, no ServiceAccount token.
    default = d.engine_pod(OWNER, spec_of(), 0)["spec"]
    assert default["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                           "capabilities": {"drop": ["ALL"]}}
    assert default["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert default["automountServiceAccountToken"] is False
    # the spec's contexts are merged over the defaults: it can set users and groups, not drop the hardening
    custom = spec_of(engine={"securityContext": {"runAsUser": 1000, "capabilities": {"add": ["IPC_LOCK"]},
                                                 "readOnlyRootFilesystem": True},
                             "podSecurityContext": {"runAsGroup": 1000, "supplementalGroups": [1001]}})
    pod = d.engine_pod(OWNER, custom, 0)
    assert pod["spec"]["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "runAsUser": 1000, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                              "runAsGroup": 1000, "supplementalGroups": [1001]}
    # root (only where the operator runs with --allow-root-engines): the default runAsNonRoot would contradict it
    root = d.engine_pod(OWNER, spec_of(engine={"podSecurityContext": {"runAsUser": 0}}), 0)["spec"]
    assert root["securityContext"] == {"runAsUser": 0, "seccompProfile": {"type": "RuntimeDefault"}}
    explicit = spec_of(engine={"securityContext": {"runAsUser": 0}, "podSecurityContext": {"runAsNonRoot": False}})
    assert d.engine_pod(OWNER, explicit, 0)["spec"]["securityContext"]["runAsNonRoot"] is False
    # A security context is pod-shaping: changing it rolls the replicas.
    assert d.spec_hash(custom) != d.spec_hash(spec_of())


def test_gateway_gets_default_requests_and_limits_for_what_its_spec_leaves_out() -> None:
    def resources(spec: PyptoServingSpec) -> dict[str, Any]:
        dep = next(o for o in d.gateway_objects(OWNER, spec) if o["kind"] == "Deployment")
        return dep["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources(spec_of()) == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"cpu": "2", "memory": "1Gi"}}
    # a resource the spec names keeps exactly what it says (no default limit below its request)
    assert resources(spec_of(gateway={"resources": {"requests": {"memory": "2Gi"}}})) == {
        "requests": {"memory": "2Gi", "cpu": "100m"}, "limits": {"cpu": "2"}}
    assert resources(spec_of(gateway={"resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}})) == {
        "limits": {"cpu": "500m", "memory": "256Mi"}}
