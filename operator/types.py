"""The PyptoServing custom resource as pydantic models: the single source of truth for the CRD.

`crd.py` turns these models into the OpenAPI schema of ``crds/pyptoservings.serving.pypto.io.yaml``;
`validation.py` parses a resource with them (bounds, enums) before the semantic checks. Field names are
snake_case in Python and camelCase (the alias) in Kubernetes. Free-form corev1 objects (a VolumeSource,
affinity, tolerations, env vars, resource requirements) are plain dicts and preserved as given.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "serving.pypto.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PyptoServing"
PLURAL = "pyptoservings"
SINGULAR = "pyptoserving"
SHORT_NAMES = ["pps"]

RoutingPolicy = Literal["least-pending-tokens", "round-robin", "least-requests", "prefix-aware", "session"]
ROUTING_POLICIES: tuple[str, ...] = RoutingPolicy.__args__  # type: ignore[attr-defined]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
SERVICE_TYPES: tuple[str, ...] = ServiceType.__args__  # type: ignore[attr-defined]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid"]
ConditionType = Literal["Ready", "Available", "Progressing", "Degraded", "SpecValid"]

# The operator's built-in defaults for the fields the CRD leaves unset; `pypto-serving operator --default-*` (the
# chart's `serving.*` values) overrides them per cluster, and `defaults.resolve` applies them (docs/architecture.md).
DEFAULT_ENGINE_IMAGE = "pypto-serving:latest"
DEFAULT_DEVICE_RESOURCE = "huawei.com/Ascend910"
DEFAULT_ROUTING: RoutingPolicy = "least-pending-tokens"
DEFAULT_SERVICE_TYPE: ServiceType = "ClusterIP"

# Free-form Kubernetes objects (kept verbatim; the apiserver preserves unknown fields below them).
KubeObject = dict[str, Any]


class _Model(BaseModel):
    """Base: camelCase aliases, Python names accepted too, unknown fields rejected in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_kube(self) -> dict[str, Any]:
        """Dump as the Kubernetes object shape (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSource(_Model):
    """Which model the engines serve and where its files come from."""

    name: str = Field(min_length=1, max_length=253, description='The OpenAI "model" name served.')
    path: str = Field(min_length=1, description="HF-format model directory inside the pod.")
    volume: KubeObject | None = Field(
        default=None, description="Any corev1 VolumeSource holding the model, mounted read-only at mountPath. A "
        "hostPath must lie under the operator's --allowed-host-paths (the chart's security.allowedHostPaths).")
    mount_path: str = Field(default="/models", min_length=1, description="Where the model volume is mounted.")
    moe: bool = Field(default=False, description="The model is a mixture-of-experts model (allows expert parallel).")


class ExpertParallel(_Model):
    """Expert parallelism for MoE models inside one replica: the experts are sharded over its TP ranks."""

    enabled: bool = Field(default=False, description="Shard the MoE experts across the replica's tensor-parallel "
                          "ranks (engine --enable-expert-parallel; EP size = tensorParallelSize).")
    placement: Literal["linear", "round_robin"] = Field(
        default="linear", description="Which rank owns which expert (--expert-placement-strategy).")
    all2all_backend: Literal["default", "allgather_reducescatter", "alltoall"] = Field(
        default="default", alias="all2allBackend", description="How tokens reach their experts (--all2all-backend); "
        "default: the engine's (allgather_reducescatter).")


class ParallelSpec(_Model):
    """Intra-replica parallel dimensions; one replica uses tensorParallelSize x pipelineParallelSize devices."""

    tensor_parallel_size: int = Field(ge=1, le=128, description="Tensor-parallel degree (devices per stage).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description=(
        "Pipeline stages; one replica runs tensorParallelSize x pipelineParallelSize ranks."))
    data_parallel_size: int = Field(
        default=1, ge=1, le=256, description="DP ranks of one DP+EP serving group, each its own pod with "
        "tensorParallelSize x pipelineParallelSize devices, stepping in lockstep; the experts of the MoE model are "
        "sharded over all DP x TP ranks (needs expertParallel.enabled).")
    expert_parallel: ExpertParallel = Field(default=ExpertParallel(), description="Expert parallelism.")


class DevicesSpec(_Model):
    """The accelerator resource each replica requests."""

    resource_name: str | None = Field(
        default=None, description="Device-plugin extended resource, e.g. huawei.com/Ascend910 or "
        f"huawei.com/ascend-1980. Defaults to the operator's --default-device-resource ({DEFAULT_DEVICE_RESOURCE}).")
    per_node: int | None = Field(
        default=None, ge=1, le=1024, description="Devices per node; lets validation reject groups that cannot fit. "
        "Defaults to the operator's --default-devices-per-node (unset: no check).")
    hccn_conf_path: str | None = Field(
        default=None, description="Host path of hccn.conf, mounted read-only at /etc/hccn.conf when set; must lie "
        "under the operator's --allowed-host-paths.")


class EngineSpec(_Model):
    """Engine container settings; the numeric knobs map to `pypto-serving engine` flags (vLLM names)."""

    image: str | None = Field(
        default=None, min_length=1, description="Engine container image. Defaults to the operator's "
        f"--default-engine-image ({DEFAULT_ENGINE_IMAGE}).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy.")
    dtype: Dtype = Field(default="auto", description="Weights and activation dtype.")
    max_model_len: int | None = Field(default=None, ge=1, le=4194304, description="--max-model-len.")
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536, description="--max-num-seqs.")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, le=4194304, description="--max-num-batched-tokens.")
    block_size: int | None = Field(default=None, ge=1, le=1024, description="--block-size (KV cache block).")
    enable_prefix_caching: bool = Field(default=True, description="--enable-prefix-caching / --no-...")
    extra_args: list[str] = Field(default=[], description="Extra engine flags appended to the command.")
    env: list[KubeObject] = Field(default=[], description="Extra corev1 EnvVar entries for the engine.")
    resources: KubeObject | None = Field(
        default=None, description="corev1 ResourceRequirements (cpu, memory). Without any cpu entry the "
        "operator's --default-engine-cpu-request/--default-engine-cpu-limit apply (the chart: 2 and 32).")
    node_selector: dict[str, str] | None = Field(default=None, description="Pod nodeSelector.")
    tolerations: list[KubeObject] | None = Field(default=None, description="Pod tolerations.")
    affinity: KubeObject | None = Field(
        default=None, description="Pod affinity; a preferred anti-affinity spreading replicas is always added.")
    priority_class_name: str | None = Field(default=None, description="Pod priorityClassName.")
    shm_size: str | None = Field(default=None, description="sizeLimit of the /dev/shm memory emptyDir.")
    startup_timeout_seconds: int = Field(
        default=1800, ge=0, le=86400, description="How long model loading may take before the pod is restarted.")
    security_context: KubeObject | None = Field(
        default=None, description="corev1 SecurityContext of the engine container, merged over the default "
        "(capabilities drop ALL, allowPrivilegeEscalation false). Rejected: privileged, privilege escalation, "
        "capabilities.add beyond the operator's --allowed-capabilities, Unconfined seccomp, unmasked /proc, "
        "SELinux type/user/role overrides, and root unless the operator allows root engines.")
    pod_security_context: KubeObject | None = Field(
        default=None, description="corev1 PodSecurityContext of the engine pod, merged over the default "
        "(runAsNonRoot, RuntimeDefault seccomp): e.g. runAsUser/runAsGroup and supplementalGroups with the node's "
        "HwHiAiUser group, which owns the Ascend device nodes. Only safe sysctls.")


class ApiKeySecret(_Model):
    """A Secret key holding the bearer token the gateway requires."""

    name: str = Field(min_length=1, description="Secret name (same namespace).")
    key: str = Field(default="api-key", min_length=1, description="Key in the Secret.")


class GatewaySpec(_Model):
    """The load-aware gateway in front of the engine pods."""

    enabled: bool = Field(default=True, description="Run a gateway Deployment and Service.")
    replicas: int = Field(default=1, ge=0, le=64, description="Gateway pods.")
    routing: RoutingPolicy | None = Field(
        default=None, description=f"Routing policy. Defaults to the operator's --default-routing ({DEFAULT_ROUTING}).")
    service_type: ServiceType | None = Field(
        default=None,
        description=f"Gateway Service type. Defaults to the operator's --default-gateway-service-type "
        f"({DEFAULT_SERVICE_TYPE}).")
    api_key_secret: ApiKeySecret | None = Field(default=None, description="Optional bearer-token auth.")
    image: str | None = Field(
        default=None, description="Gateway image. Defaults to the operator's --default-gateway-image "
        "(unset: the engine image).")
    resources: KubeObject | None = Field(
        default=None, description="corev1 ResourceRequirements of the gateway; cpu and memory left out get "
        "requests 100m/128Mi and limits 2/1Gi.")


class RolloutSpec(_Model):
    """How a pod-shaping change replaces replicas."""

    max_unavailable: int = Field(default=1, ge=0, le=1024, description="Replicas that may be down during a rollout.")
    max_surge: int = Field(default=0, ge=0, le=1024, description="Extra replicas that may be created above replicas.")


class DrainSpec(_Model):
    """Two-phase scale-down: how long a draining replica may finish its work."""

    timeout_seconds: int = Field(default=600, ge=0, le=86400, description="Drain deadline before deletion.")


class NetworkPolicySpec(_Model):
    """The NetworkPolicy that lets only the gateway and the operator reach the engine pods."""

    enabled: bool = Field(default=True, description="Create the engine pods' NetworkPolicy.")
    extra_ingress_from: list[KubeObject] = Field(
        default=[], description="More NetworkPolicyPeer entries allowed to reach the engines (e.g. Prometheus).")


class PyptoServingSpec(_Model):
    """Desired state of a PyptoServing: DP replicas of an engine, each a serving group of one or more pods."""

    replicas: int = Field(default=1, ge=0, le=1024, description="Data-parallel replicas: serving groups of "
                          "podsPerGroup engine pods each (one pod while TP x PP fits devices.perNode).")
    model: ModelSource = Field(description="The served model.")
    parallel: ParallelSpec = Field(description="Intra-replica parallelism.")
    devices: DevicesSpec = Field(default=DevicesSpec(), description="Accelerator resource.")
    engine: EngineSpec = Field(default=EngineSpec(), description="Engine container settings.")
    gateway: GatewaySpec = Field(default=GatewaySpec(), description="Gateway settings.")
    rollout: RolloutSpec = Field(default=RolloutSpec(), description="Rolling update settings.")
    drain: DrainSpec = Field(default=DrainSpec(), description="Drain settings.")
    network_policy: NetworkPolicySpec = Field(
        default=NetworkPolicySpec(), description="Engine ingress restricted to the gateway and the operator.")
    group_start_timeout_seconds: int = Field(
        default=600, ge=1, le=86400, description="How long a serving group of several pods may wait to be fully "
        "scheduled; then its pods are deleted (releasing their devices) and creating it is retried after as long.")

    @property
    def devices_per_replica(self) -> int:
        """Devices one model instance requests: TP x PP."""
        return self.parallel.tensor_parallel_size * self.parallel.pipeline_parallel_size


class _Status(BaseModel):
    """Base for status models: camelCase, tolerant of fields written by others."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_kube(self) -> dict[str, Any]:
        """Dump as the Kubernetes object shape."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(_Status):
    """A standard Kubernetes condition."""

    type: ConditionType = Field(description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str | None = Field(default=None, description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="Generation this was computed for.")


class ReplicaStatus(_Status):
    """One engine pod."""

    rank: int = Field(description="DP rank (the index of its serving group).")
    group_pod: int | None = Field(default=None, description="Index in a multi-pod group.")
    role: str | None = Field(default=None, description="leader or worker, in a multi-pod group.")
    pod: str = Field(description="Pod name.")
    node: str | None = Field(default=None, description="Node the pod runs on.")
    devices: str | None = Field(default=None, description="Devices assigned (from the device plugin).")
    phase: str | None = Field(default=None, description="Pod phase.")
    ready: bool = Field(default=False, description="Pod Ready.")
    draining: bool = Field(default=False, description="Being drained before deletion.")
    spec_hash: str | None = Field(default=None, description="Spec hash the pod was built from.")


class GroupStatus(_Status):
    """One serving group (a replica): its pods, whether all are Ready, and which serve."""

    group: int = Field(description="Group index (the dp-rank label of its pods).")
    ready: bool = Field(default=False, description="Every pod of the group is Ready.")
    draining: bool = Field(default=False, description="Being drained before deletion.")
    spec_hash: str | None = Field(default=None, description="Spec hash the group was built from.")
    serving: list[str] = Field(default=[], description="Pods that run an OpenAI server (gateway candidates).")
    pods: list[ReplicaStatus] = Field(default=[], description="Its pods (with node and devices).")


class GroupStartFailure(_Status):
    """The last serving group deleted because it was not fully scheduled in time."""

    group: int = Field(description="Group index.")
    time: str = Field(description="When its pods were deleted (RFC 3339).")
    message: str = Field(description="Why (the scheduler's message).")


class GatewayStatus(_Status):
    """Where the gateway is reachable."""

    service: str | None = Field(default=None, description="Gateway Service name.")
    url: str | None = Field(default=None, description="Gateway URL (cluster DNS).")


class PyptoServingStatus(_Status):
    """Observed state of a PyptoServing."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    replicas: int | None = Field(default=None, description="Serving groups that exist (scale subresource).")
    ready_replicas: int | None = Field(default=None, description="Serving groups whose pods are all Ready.")
    updated_replicas: int | None = Field(default=None, description="Serving groups on the current spec hash.")
    devices_per_replica: int | None = Field(default=None, description="TP x PP.")
    pods_per_group: int | None = Field(default=None, description="Pods per serving group (1: a plain replica).")
    devices_per_pod: int | None = Field(default=None, description="Devices each engine pod requests.")
    device_resource_name: str | None = Field(
        default=None, description="The device resource each replica requests (spec, else the operator's default).")
    selector: str | None = Field(default=None, description="Label selector of the engine pods (scale subresource).")
    spec_hash: str | None = Field(default=None, description="Hash of the current pod-shaping spec.")
    phase: Phase | None = Field(default=None, description="Pending, Progressing, Ready, Degraded or Invalid.")
    conditions: list[Condition] = Field(default=[], description="Ready, Available, Progressing, Degraded, SpecValid.")
    replica_statuses: list[ReplicaStatus] = Field(default=[], description="Per-pod detail.")
    groups: list[GroupStatus] = Field(default=[], description="Per-group detail.")
    last_group_start_failure: GroupStartFailure | None = Field(
        default=None, description="The last group not fully scheduled within groupStartTimeoutSeconds.")
    gateway: GatewayStatus | None = Field(default=None, description="Gateway endpoint.")
