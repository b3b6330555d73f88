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
}


@dataclass(frozen=True)
class OperatorDefaults:
    """The values used for unset spec fields (the operator's ``--default-*`` flags)."""

    engine_image: str = DEFAULT_ENGINE_IMAGE
    gateway_image: str | None = None  # None: the resource's engine image
    device_resource_name: str = DEFAULT_DEVICE_RESOURCE
    devices_per_node: int | None = None  # None: no fit check
    routing: RoutingPolicy = DEFAULT_ROUTING
    gateway_service_type: ServiceType = DEFAULT_SERVICE_TYPE


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
    engine = spec.engine.model_copy(update={"image": engine_image})
    gateway = spec.gateway.model_copy(update={
        "image": spec.gateway.image or defaults.gateway_image or engine_image,
        "routing": spec.gateway.routing or defaults.routing,
        "service_type": spec.gateway.service_type or defaults.gateway_service_type})
    return spec.model_copy(update={"devices": devices, "engine": engine, "gateway": gateway})


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
    return {field for field, missing in unset.items() if missing}
