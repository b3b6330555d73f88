"""Operator-level defaults: the values a PyptoServing gets for the fields its spec leaves out.

The CRD does not default these fields server-side, so a stored object shows only what its author wrote and the
cluster's operator decides the rest: ``pypto-serving operator --default-engine-image ... --default-device-resource
... --default-devices-per-node ... --default-routing ... --default-gateway-image ... --default-gateway-service-type
...`` (the helm chart passes its ``serving.*`` values). `resolve` is the one place where "the spec's value, else the
operator's default" is decided; validation's semantic checks, the desired state, the spec hash and the status all
see only its result. A changed default therefore reaches every resource that relies on it at the next reconcile
(engine image or device resource: a rolling update, like a spec change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pypto_serving.operator.security import DEFAULT_ALLOWED_CAPABILITIES, DEFAULT_ALLOWED_HOST_PATHS
from pypto_serving.operator.types import (
    DEFAULT_DEVICE_RESOURCE,
    DEFAULT_ENGINE_IMAGE,
    DEFAULT_ROUTING,
    DEFAULT_SERVICE_TYPE,
    PyptoServingSpec,
    RoutingPolicy,
    ServiceType,
)

# spec field -> the operator flag that defaults it (for messages and docs)
FLAGS = {
    "spec.engine.image": "--default-engine-image",
    "spec.gateway.image": "--default-gateway-image",
    "spec.devices.resourceName": "--default-device-resource",
    "spec.devices.perNode": "--default-devices-per-node",
    "spec.gateway.routing": "--default-routing",
    "spec.gateway.serviceType": "--default-gateway-service-type",
    "spec.engine.resources.requests.cpu": "--default-engine-cpu-request",
    "spec.engine.resources.limits.cpu": "--default-engine-cpu-limit",
}
# None: the bare operator adds no CPU request or limit, so upgrading it keeps every replica's spec hash; the chart
# sets serving.engine.cpuRequest/cpuLimit (2 and 32 cores), which rolls the replicas once when first installed.
DEFAULT_ENGINE_CPU_REQUEST: str | None = None
DEFAULT_ENGINE_CPU_LIMIT: str | None = None


@dataclass(frozen=True)
class OperatorDefaults:
    """The values used for unset spec fields (the operator's ``--default-*`` flags)."""

    engine_image: str = DEFAULT_ENGINE_IMAGE
    gateway_image: str | None = None  # None: the resource's engine image
    device_resource_name: str = DEFAULT_DEVICE_RESOURCE
    devices_per_node: int | None = None  # None: no fit check
    routing: RoutingPolicy = DEFAULT_ROUTING
    gateway_service_type: ServiceType = DEFAULT_SERVICE_TYPE
    # The engine's CPU request and limit, set when spec.engine.resources names no cpu at all (None: not set).
    engine_cpu_request: str | None = DEFAULT_ENGINE_CPU_REQUEST
    engine_cpu_limit: str | None = DEFAULT_ENGINE_CPU_LIMIT
    # Cluster policy, not defaults: what a resource may ask of the nodes (operator/security.py). The chart's
    # security.* values set them; a resource cannot widen them.
    allowed_host_paths: tuple[str, ...] = DEFAULT_ALLOWED_HOST_PATHS
    allowed_capabilities: tuple[str, ...] = DEFAULT_ALLOWED_CAPABILITIES
    allow_root_engines: bool = False


BUILTIN = OperatorDefaults()


def resolve(spec: PyptoServingSpec, defaults: OperatorDefaults = BUILTIN) -> PyptoServingSpec:
    """Pure: ``spec`` with every operator-defaulted field that it leaves unset filled from ``defaults``.

    Fields the spec sets are kept as they are (validation then reports them under their own names). The gateway
    image falls back to the operator's default gateway image, else the resolved engine image.
    """
    engine_image = spec.engine.image or defaults.engine_image
    devices = spec.devices.model_copy(update={
        "resource_name": spec.devices.resource_name or defaults.device_resource_name,
        "per_node": spec.devices.per_node if spec.devices.per_node is not None else defaults.devices_per_node})
    engine = spec.engine.model_copy(update={"image": engine_image,
                                            "resources": engine_resources(spec.engine.resources, defaults)})
    gateway = spec.gateway.model_copy(update={
        "image": spec.gateway.image or defaults.gateway_image or engine_image,
        "routing": spec.gateway.routing or defaults.routing,
        "service_type": spec.gateway.service_type or defaults.gateway_service_type})
    return spec.model_copy(update={"devices": devices, "engine": engine, "gateway": gateway})


def engine_resources(resources: dict[str, Any] | None, defaults: OperatorDefaults) -> dict[str, Any] | None:
    """Pure: the spec's engine resources, with the default CPU request and limit when it names no cpu at all
    (a spec that sets either keeps exactly what it says, so a default never contradicts it)."""
    sections = {k: dict(v) for k, v in (resources or {}).items() if isinstance(v, dict)}
    if any("cpu" in section for section in sections.values()) or not (defaults.engine_cpu_request
                                                                        or defaults.engine_cpu_limit):
        return resources
    out: dict[str, Any] = {**(resources or {}), **sections}
    if defaults.engine_cpu_request:
        out["requests"] = {**out.get("requests", {}), "cpu": defaults.engine_cpu_request}
    if defaults.engine_cpu_limit:
        out["limits"] = {**out.get("limits", {}), "cpu": defaults.engine_cpu_limit}
    return out


def defaulted_fields(spec: PyptoServingSpec) -> set[str]:
    """Pure: the operator-defaulted fields (``spec.…`` paths) that the unresolved ``spec`` leaves unset."""
    unset = {
        "spec.engine.image": spec.engine.image is None,
        "spec.gateway.image": spec.gateway.image is None,
        "spec.devices.resourceName": spec.devices.resource_name is None,
        "spec.devices.perNode": spec.devices.per_node is None,
        "spec.gateway.routing": spec.gateway.routing is None,
        "spec.gateway.serviceType": spec.gateway.service_type is None,
    }
    named_cpu = any(isinstance(v, dict) and "cpu" in v for v in (spec.engine.resources or {}).values())
    unset["spec.engine.resources.requests.cpu"] = unset["spec.engine.resources.limits.cpu"] = not named_cpu
    return {field for field, missing in unset.items() if missing}
