"""Pure functions: a PyptoServing spec -> the manifests it should have (engine pods, Services, gateway).

Nothing here talks to Kubernetes. The reconciler compares these manifests with what it observes and applies
the difference. Names and labels follow CONTRACT.md ("Engine pods"). Every function takes the spec as
`validation.validate` returns it: resolved with the operator's defaults (`defaults.resolve`), so the image,
device resource, routing and Service type are always set.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pypto_serving.contract import (  # the names every part shares (CONTRACT.md)
    APP,
    CONTROL_SECRET_KEY,
    CONTROL_TOKEN_DIR,
    CONTROL_TOKEN_FILE,
    CONTROL_TOKEN_FLAG,
    ENGINE,
    ENGINE_PORT,
    ENGINE_PORT_NAME,
    ENV_GROUP_LEADER_ADDR,
    ENV_GROUP_LEADER_HOST,
    ENV_GROUP_PORT,
    ENV_GROUP_RANK,
    ENV_GROUP_SIZE,
    ENV_HCCL_IF_IP,
    ENV_POD_IP,
    ENV_POD_NAME,
    ENV_POD_NAMESPACE,
    ENV_PP_SIZE,
    ENV_TP_SIZE,
    ENV_WORLD_SIZE,
    GATEWAY,
    GATEWAY_PORT,
    GROUP_PORT,
    GROUP_PORT_NAME,
    L_COMPONENT,
    L_GROUP_POD,
    L_GROUP_READY,
    L_GROUP_SIZE,
    L_HASH,
    L_INSTANCE,
    L_MANAGED_BY,
    L_NAME,
    L_RANK,
    L_ROLE,
    L_SERVES,
    MANAGER,
    OPERATOR,
    PATH_HEALTH,
    PATH_READY,
    ROLE_LEADER,
    ROLE_WORKER,
)
from pypto_serving.operator.groups import GroupShape, group_shape
from pypto_serving.operator.types import API_VERSION, KIND, PyptoServingSpec

DRAIN_GRACE_SLACK = 30  # seconds of terminationGracePeriod beyond drain.timeoutSeconds
PROBE_PERIOD = 2
API_KEY_DIR = "/etc/pypto-serving/api-key"
# Labels of the operator's pods (the helm chart's selector labels), allowed to reach the engines' /load and /drain.
OPERATOR_POD_LABELS = {L_NAME: APP, L_COMPONENT: OPERATOR}
# The label Kubernetes (>= 1.21) puts on every namespace: its name. The NetworkPolicy admits the operator's pods
# only from the operator's own namespace through it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Engine pods, hardened (operator/security.py rejects specs that would weaken this): no capabilities (Ascend NPUs
# need none: the device plugin grants the device nodes through cgroups), no privilege escalation, RuntimeDefault
# seccomp, non-root, and no ServiceAccount token (engines never call the API server). A spec's securityContext
# and podSecurityContext are merged over these. Non-root: Ascend device nodes (/dev/davinci*) are usually
# root:HwHiAiUser 0660 with per-node ids, so the engine's user needs the HwHiAiUser group (podSecurityContext
# supplementalGroups) or root where the cluster allows it (--allow-root-engines; docs/architecture.md, Security).
ENGINE_SECURITY_CONTEXT: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
ENGINE_POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
# The gateway's resources for whatever its spec leaves out (a resource whose request or limit the spec names is
# kept as given): a memory limit by default, so a leak cannot take its node's memory.
GATEWAY_DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
# The gateway needs no privilege and no disk: non-root, read-only root filesystem, no capabilities.
GATEWAY_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
GATEWAY_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


@dataclass(frozen=True)
class Owner:
    """The PyptoServing that owns the children (for names, namespace and the owner reference)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        """ownerReference for garbage collection when the PyptoServing is deleted."""
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def pod_name(name: str, rank: int, index: int | None = None) -> str:
    """Engine pod name of a DP rank (a one-pod group), or of pod ``index`` of a multi-pod group."""
    return f"{name}-dp-{rank}" if index is None else f"{name}-dp-{rank}-{index}"


def group_pod_name(name: str, rank: int, index: int, shape: GroupShape) -> str:
    """Name of pod ``index`` of group ``rank``: ``<name>-dp-<rank>`` for a one-pod group (as always)."""
    return pod_name(name, rank, index if shape.multi else None)


def leader_host(owner: Owner, rank: int, shape: GroupShape) -> str:
    """The leader's DNS name through the headless engine Service (clusters with DNS)."""
    return f"{group_pod_name(owner.name, rank, 0, shape)}.{engine_service_name(owner.name)}.{owner.namespace}.svc"


def engine_service_name(name: str) -> str:
    """Headless Service of the engine pods (the pods' DNS subdomain)."""
    return f"{name}-engines"


def gateway_name(name: str) -> str:
    """Name of the gateway Deployment, Service, ServiceAccount, Role and RoleBinding."""
    return f"{name}-gateway"


def control_secret_name(name: str) -> str:
    """The Secret holding the engines' control token (mounted into every engine pod)."""
    return f"{name}-control"


def engine_selector(name: str) -> dict[str, str]:
    """Labels selecting the engine pods of one PyptoServing."""
    return {L_INSTANCE: name, L_COMPONENT: ENGINE}


def selector_string(labels: dict[str, str]) -> str:
    """``k=v,k=v`` form of a label selector."""
    return ",".join(f"{key}={value}" for key, value in labels.items())


def _common_labels(name: str, component: str) -> dict[str, str]:
    return {L_NAME: APP, L_INSTANCE: name, L_COMPONENT: component, L_MANAGED_BY: MANAGER}


def pod_shaping(spec: PyptoServingSpec) -> dict[str, Any]:
    """The part of the spec that shapes an engine pod (replicas, gateway, rollout and drain excluded; so is
    devices.perNode itself: it restarts a one-pod group never, and a multi-pod group only through the split into pods
    it decides, which is included as ``group``)."""
    devices = spec.devices.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"per_node"})
    parallel = spec.parallel.to_kube()
    if parallel.get("dataParallelSize") == 1:
        del parallel["dataParallelSize"]  # absent before serving groups: a one-pod group keeps its hash
    out = {"model": spec.model.to_kube(), "parallel": parallel, "devices": devices, "engine": spec.engine.to_kube()}
    shape = group_shape(spec)
    if shape.multi:  # the split into pods (from devices.perNode) shapes every pod of a multi-pod group
        out["group"] = {"pods": shape.pods, "devicesPerPod": shape.devices_per_pod}
    return out


def digest(obj: Any, length: int = 10) -> str:
    """Stable short hash of a JSON-able value."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def spec_hash(spec: PyptoServingSpec) -> str:
    """Hash of the pod-shaping spec: a change means the replicas must be replaced (rolling update)."""
    return digest(pod_shaping(spec))


@dataclass(frozen=True)
class GroupPod:
    """Which pod of which group a manifest is for; ``leader_addr`` is the leader pod's IP (workers only: they are
    created once the leader has one, because the local cluster has no DNS)."""

    rank: int
    index: int = 0
    leader_addr: str | None = None


def group_port(rank: int) -> int:
    """The rendezvous port of group ``rank``: distinct per group, because the local cluster's pods share one
    network namespace and torch.distributed's store listens on every address (harmless on real nodes)."""
    return GROUP_PORT + rank


def group_args(spec: PyptoServingSpec, shape: GroupShape, where: GroupPod) -> list[str]:
    """Rendezvous flags of a multi-pod group's pod (vLLM's names): a large replica's leader serves and its workers
    run model ranks only (``--headless``); every rank of a DP+EP group serves."""
    addr = where.leader_addr if where.index else f"$({ENV_POD_IP})"
    if shape.all_serve:
        return ["--data-parallel-size", str(shape.pods), "--data-parallel-rank", str(where.index),
                "--data-parallel-address", str(addr), "--data-parallel-rpc-port", str(group_port(where.rank))]
    args = ["--nnodes", str(shape.pods), "--node-rank", str(where.index), "--master-addr", str(addr),
            "--master-port", str(group_port(where.rank))]
    return args + (["--headless"] if where.index else [])


def engine_args(spec: PyptoServingSpec) -> list[str]:
    """`pypto-serving engine` flags for the spec (CONTRACT.md command line; vLLM flag names)."""
    eng = spec.engine
    args = ["--model", spec.model.path, "--served-model-name", spec.model.name,
            "--host", "$(POD_IP)", "--port", str(ENGINE_PORT),
            "--tensor-parallel-size", str(spec.parallel.tensor_parallel_size),
            "--pipeline-parallel-size", str(spec.parallel.pipeline_parallel_size), "--dtype", eng.dtype]
    for flag, value in (("--max-model-len", eng.max_model_len), ("--max-num-seqs", eng.max_num_seqs),
                        ("--max-num-batched-tokens", eng.max_num_batched_tokens), ("--block-size", eng.block_size)):
        if value is not None:
            args += [flag, str(value)]
    args.append("--enable-prefix-caching" if eng.enable_prefix_caching else "--no-enable-prefix-caching")
    ep = spec.parallel.expert_parallel
    if ep.enabled:  # EP inside the pod, over its TP ranks
        args += ["--enable-expert-parallel", "--expert-placement-strategy", ep.placement]
        if ep.all2all_backend != "default":
            args += ["--all2all-backend", ep.all2all_backend]
    return args + list(eng.extra_args)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def group_env(owner: Owner, spec: PyptoServingSpec, shape: GroupShape, where: GroupPod) -> list[dict[str, Any]]:
    """Env of a multi-pod group's pod: group size and rank, the leader's IP, DNS name and port, the world size."""
    world = spec.devices_per_replica * (shape.pods if shape.all_serve else 1)
    return [{"name": ENV_GROUP_SIZE, "value": str(shape.pods)},
            {"name": ENV_GROUP_RANK, "value": str(where.index)},
            {"name": ENV_GROUP_LEADER_ADDR, "value": where.leader_addr if where.index else f"$({ENV_POD_IP})"},
            {"name": ENV_GROUP_LEADER_HOST, "value": leader_host(owner, where.rank, shape)},
            {"name": ENV_GROUP_PORT, "value": str(group_port(where.rank))},
            {"name": ENV_WORLD_SIZE, "value": str(world)}]


def engine_env(spec: PyptoServingSpec) -> list[dict[str, Any]]:
    """Env of an engine container: TP/PP sizes, downward API, HCCL_IF_IP from the pod IP, user env. (The replica's
    rank is in the pod name and the dp-rank label; expert parallelism goes as engine flags, see `engine_args`.)"""
    par = spec.parallel
    env: list[dict[str, Any]] = [
        {"name": ENV_TP_SIZE, "value": str(par.tensor_parallel_size)},
        {"name": ENV_PP_SIZE, "value": str(par.pipeline_parallel_size)},
        _field_env(ENV_POD_NAME, "metadata.name"),
        _field_env(ENV_POD_NAMESPACE, "metadata.namespace"),
        _field_env(ENV_POD_IP, "status.podIP"),
        {"name": ENV_HCCL_IF_IP, "value": f"$({ENV_POD_IP})"},
    ]
    return env + [copy.deepcopy(var) for var in spec.engine.env]


def _resources(user: dict[str, Any] | None, extra: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": {}, "limits": {}}
    for section in ("requests", "limits"):
        out[section].update({k: str(v) for k, v in ((user or {}).get(section) or {}).items()})
        out[section].update(extra)
    return out


def _affinity(name: str, user: dict[str, Any] | None) -> dict[str, Any]:
    """User affinity plus a preferred pod anti-affinity spreading this resource's replicas across nodes."""
    affinity = copy.deepcopy(user or {})
    anti = affinity.setdefault("podAntiAffinity", {})
    anti.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append({
        "weight": 100,
        "podAffinityTerm": {"labelSelector": {"matchLabels": engine_selector(name)},
                            "topologyKey": "kubernetes.io/hostname"}})
    return affinity


def _http_probe(path: str, port: int, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def engine_security_context(user: dict[str, Any] | None) -> dict[str, Any]:
    """The engine container's securityContext: the spec's merged over the hardened default; capabilities are
    always ``drop: [ALL]`` plus the spec's ``add`` (validation allows only the cluster's allowed ones)."""
    ctx = {**copy.deepcopy(ENGINE_SECURITY_CONTEXT), **copy.deepcopy(user or {})}
    added = ((user or {}).get("capabilities") or {}).get("add")
    ctx["capabilities"] = {"drop": ["ALL"], **({"add": list(added)} if added else {})}
    ctx["allowPrivilegeEscalation"] = False
    return ctx


def engine_pod_security_context(user: dict[str, Any] | None, container: dict[str, Any] | None) -> dict[str, Any]:
    """The engine pod's securityContext: the spec's merged over the default. An explicit uid 0 (allowed only with
    --allow-root-engines) drops the default runAsNonRoot, which the kubelet would otherwise refuse."""
    ctx = {**copy.deepcopy(ENGINE_POD_SECURITY_CONTEXT), **copy.deepcopy(user or {})}
    root = 0 in ((user or {}).get("runAsUser"), (container or {}).get("runAsUser"))
    if root and "runAsNonRoot" not in (user or {}):
        ctx.pop("runAsNonRoot")
    return ctx


def gateway_resources(user: dict[str, Any] | None) -> dict[str, Any]:
    """The gateway container's resources: the spec's, plus `GATEWAY_DEFAULT_RESOURCES` for each resource (cpu,
    memory) whose request and limit the spec both leave out."""
    out = copy.deepcopy(user or {})
    named = {name for section in out.values() if isinstance(section, dict) for name in section}
    for section, values in GATEWAY_DEFAULT_RESOURCES.items():
        for name, quantity in values.items():
            if name not in named:
                out.setdefault(section, {})[name] = quantity
    return out


def engine_pod(owner: Owner, spec: PyptoServingSpec, rank: int, shape_hash: str | None = None,
               where: GroupPod | None = None) -> dict[str, Any]:
    """The engine pod of one DP rank (a one-pod group), or of pod ``where.index`` of a multi-pod group."""
    shape = group_shape(spec)
    where = where or GroupPod(rank)
    name = group_pod_name(owner.name, rank, where.index, shape)
    eng, dev = spec.engine, spec.devices
    devices = str(shape.devices_per_pod)
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    shm: dict[str, Any] = {"medium": "Memory"}
    if eng.shm_size:
        shm["sizeLimit"] = eng.shm_size
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": shm}]
    if spec.model.volume is not None:
        volumes.append({"name": "model", **copy.deepcopy(spec.model.volume)})
        mounts.append({"name": "model", "mountPath": spec.model.mount_path, "readOnly": True})
    if dev.hccn_conf_path:
        volumes.append({"name": "hccn-conf", "hostPath": {"path": dev.hccn_conf_path, "type": "File"}})
        mounts.append({"name": "hccn-conf", "mountPath": "/etc/hccn.conf", "readOnly": True})
    # The control token (POST/DELETE /drain need it): the resource's Secret, one key, read-only.
    volumes.append({"name": "control-token", "secret": {
        "secretName": control_secret_name(owner.name),
        "items": [{"key": CONTROL_SECRET_KEY, "path": CONTROL_SECRET_KEY}]}})
    mounts.append({"name": "control-token", "mountPath": CONTROL_TOKEN_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": ENGINE,
        "image": eng.image,
        "imagePullPolicy": eng.image_pull_policy,
        "command": ["pypto-serving", "engine"],
        "args": engine_args(spec) + [CONTROL_TOKEN_FLAG, CONTROL_TOKEN_FILE]
        + (group_args(spec, shape, where) if shape.multi else []),
        "ports": [{"name": ENGINE_PORT_NAME, "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": engine_env(spec) + (group_env(owner, spec, shape, where) if shape.multi else []),
        "resources": _resources(eng.resources, {dev.resource_name: devices}),
        "readinessProbe": _http_probe(PATH_READY, ENGINE_PORT, PROBE_PERIOD, 2),
        "livenessProbe": _http_probe(PATH_HEALTH, ENGINE_PORT, 10, 3, timeout=5),
        "volumeMounts": mounts,
        "securityContext": engine_security_context(eng.security_context),
    }
    if eng.startup_timeout_seconds > 0:
        container["startupProbe"] = _http_probe(
            PATH_READY, ENGINE_PORT, PROBE_PERIOD, max(1, -(-eng.startup_timeout_seconds // PROBE_PERIOD)))
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": engine_service_name(owner.name),
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": spec.drain.timeout_seconds + DRAIN_GRACE_SLACK,
        "containers": [container],
        "volumes": volumes,
        "affinity": _affinity(owner.name, eng.affinity),
        "automountServiceAccountToken": False,
        "securityContext": engine_pod_security_context(eng.pod_security_context, eng.security_context),
    }
    if eng.node_selector:
        pod_spec["nodeSelector"] = dict(eng.node_selector)
    if eng.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(eng.tolerations)
    if eng.priority_class_name:
        pod_spec["priorityClassName"] = eng.priority_class_name
    labels = {**_common_labels(owner.name, ENGINE), L_RANK: str(rank), L_HASH: shape_hash or spec_hash(spec)}
    if shape.multi:
        # A rank that restarts cannot rejoin its distributed world: the pod fails instead, and the planner
        # recreates the whole group.
        pod_spec["restartPolicy"] = "Never"
        serves = shape.serves(where.index)
        labels.update({L_GROUP_POD: str(where.index), L_GROUP_SIZE: str(shape.pods),
                       L_ROLE: ROLE_WORKER if where.index else ROLE_LEADER, L_SERVES: str(serves).lower()})
        if serves:
            labels[L_GROUP_READY] = "false"  # set to true by the operator once every pod of the group is Ready
        if where.index == 0:
            container["ports"].append({"name": GROUP_PORT_NAME, "containerPort": group_port(rank), "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": owner.namespace, "labels": labels,
                         "ownerReferences": [owner.reference()]},
            "spec": pod_spec}


def engine_service(owner: Owner) -> dict[str, Any]:
    """Headless Service of the engine pods (stable DNS per pod; not a load balancer)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": engine_service_name(owner.name), "namespace": owner.namespace,
                         "labels": _common_labels(owner.name, ENGINE), "ownerReferences": [owner.reference()]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": engine_selector(owner.name),
                     "ports": [{"name": ENGINE_PORT_NAME, "port": ENGINE_PORT, "targetPort": ENGINE_PORT,
                                "protocol": "TCP"}]}}


def control_secret(owner: Owner, token: str) -> dict[str, Any]:
    """The Secret with the engines' control token (the operator creates it once; see operator/control.py)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": control_secret_name(owner.name), "namespace": owner.namespace,
                         "labels": _common_labels(owner.name, ENGINE), "ownerReferences": [owner.reference()]},
            "data": {CONTROL_SECRET_KEY: base64.b64encode(token.encode()).decode()}}


def gateway_selector(name: str) -> dict[str, str]:
    """Labels selecting the gateway pods of one PyptoServing."""
    return {L_INSTANCE: name, L_COMPONENT: GATEWAY}


def gateway_args(owner: Owner, spec: PyptoServingSpec) -> list[str]:
    """`pypto-serving gateway` flags: discover this resource's engine pods by label in its namespace."""
    args = ["--namespace", owner.namespace, "--selector", selector_string(engine_selector(owner.name)),
            "--policy", spec.gateway.routing, "--host", "$(POD_IP)", "--port", str(GATEWAY_PORT)]
    if spec.gateway.api_key_secret is not None:
        args += ["--api-key-file", f"{API_KEY_DIR}/{spec.gateway.api_key_secret.key}"]
    return args


def gateway_objects(owner: Owner, spec: PyptoServingSpec) -> list[dict[str, Any]]:
    """ServiceAccount, Role (read pods), RoleBinding, Deployment and Service of the gateway."""
    gname, ns, gw = gateway_name(owner.name), owner.namespace, spec.gateway
    meta = {"name": gname, "namespace": ns, "labels": _common_labels(owner.name, GATEWAY),
            "ownerReferences": [owner.reference()]}
    container: dict[str, Any] = {
        "name": GATEWAY, "image": gw.image or spec.engine.image, "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["pypto-serving", "gateway"], "args": gateway_args(owner, spec),
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": [_field_env(ENV_POD_NAMESPACE, "metadata.namespace"), _field_env(ENV_POD_IP, "status.podIP")],
        "readinessProbe": _http_probe(PATH_READY, GATEWAY_PORT, PROBE_PERIOD, 2),
        "livenessProbe": _http_probe(PATH_HEALTH, GATEWAY_PORT, 10, 3, timeout=5),
        "securityContext": copy.deepcopy(GATEWAY_SECURITY_CONTEXT),
        "resources": gateway_resources(gw.resources),
    }
    pod_spec: dict[str, Any] = {"serviceAccountName": gname, "containers": [container],
                                "securityContext": copy.deepcopy(GATEWAY_POD_SECURITY_CONTEXT)}
    if gw.api_key_secret is not None:
        container["volumeMounts"] = [{"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True}]
        pod_spec["volumes"] = [{"name": "api-key", "secret": {
            "secretName": gw.api_key_secret.name,
            "items": [{"key": gw.api_key_secret.key, "path": gw.api_key_secret.key}]}}]
    pod_labels = {**_common_labels(owner.name, GATEWAY)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": copy.deepcopy(meta)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": copy.deepcopy(meta),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": copy.deepcopy(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": gname},
         "subjects": [{"kind": "ServiceAccount", "name": gname, "namespace": ns}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": copy.deepcopy(meta),
         "spec": {"replicas": gw.replicas, "selector": {"matchLabels": gateway_selector(owner.name)},
                  "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(meta),
         "spec": {"type": gw.service_type, "selector": gateway_selector(owner.name),
                  "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "TCP"}]}},
    ]


def network_policy_name(name: str) -> str:
    """Name of the engine pods' NetworkPolicy."""
    return f"{name}-engines"


def network_policy(owner: Owner, spec: PyptoServingSpec, operator_namespace: str) -> dict[str, Any]:
    """NetworkPolicy: the engine pods accept TCP 8000 only from this resource's gateway pods (same namespace),
    from the operator's pods in the operator's own namespace (by the ``kubernetes.io/metadata.name`` label that
    Kubernetes >= 1.21 sets on every namespace) and from ``spec.networkPolicy.extraIngressFrom``. Only a CNI that
    implements NetworkPolicy enforces it."""
    peers: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": gateway_selector(owner.name)}},
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator_namespace}},
         "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}},
    ]
    peers += [copy.deepcopy(peer) for peer in spec.network_policy.extra_ingress_from]
    ingress: list[dict[str, Any]] = [{"from": peers, "ports": [{"protocol": "TCP", "port": ENGINE_PORT}]}]
    if group_shape(spec).multi:  # a group's pods talk to each other on ports torch.distributed / HCCL choose
        ingress.append({"from": [{"podSelector": {"matchLabels": engine_selector(owner.name)}}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": network_policy_name(owner.name), "namespace": owner.namespace,
                         "labels": _common_labels(owner.name, ENGINE), "ownerReferences": [owner.reference()]},
            "spec": {"podSelector": {"matchLabels": engine_selector(owner.name)}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}


def gateway_url(owner: Owner) -> str:
    """In-cluster URL of the gateway Service."""
    return f"http://{gateway_name(owner.name)}.{owner.namespace}.svc:{GATEWAY_PORT}"


def children(owner: Owner, spec: PyptoServingSpec, operator_namespace: str) -> list[dict[str, Any]]:
    """Every non-pod object the resource should own and keeps applied (the gateway ones only when enabled; the
    control Secret is created once, apart: `control_secret`)."""
    out = [engine_service(owner)]
    if spec.network_policy.enabled:
        out.append(network_policy(owner, spec, operator_namespace))
    if spec.gateway.enabled:
        out += gateway_objects(owner, spec)
    return out

