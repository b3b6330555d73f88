"""Thin kopf handlers: every watch event only enqueues the affected PyptoServing; the webhook validates.

kopf provides the watches (with reconnects), the admission webhook server and the process lifecycle; the
reconcile itself runs in the controller's workers (controller.py), one at a time per resource. Only
``on.event`` handlers are used, so kopf writes nothing (no annotations, no finalizers) on the resources.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from lightkube import KubeConfig

from pypto_serving import contract
from pypto_serving.kube import credentials
from pypto_serving.operator.controller import Controller
from pypto_serving.operator.defaults import BUILTIN, OperatorDefaults
from pypto_serving.operator.types import GROUP, PLURAL, VERSION
from pypto_serving.operator.validation import summary, validate
from pypto_serving.operator.webhook import HANDLER_ID

log = logging.getLogger("pypto_serving.operator.handlers")


def admission_decision(body: dict[str, Any], old: dict[str, Any] | None, operation: str | None,
                       defaults: OperatorDefaults = BUILTIN) -> str | None:
    """Pure: the rejection message for an admission request, or None to allow it.

    Updates that leave the spec unchanged (labels, finalizers, deletion) are always allowed, so an object
    that became invalid while the webhook was down can still be cleaned up.
    """
    if operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec"):
        return None
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    _, problems = validate(body, defaults)
    return summary(problems) if problems else None


def build_registry(controller: Controller, config: KubeConfig, on_startup: Callable[[], Awaitable[None]],
                   on_cleanup: Callable[[], Awaitable[None]], webhook: bool,
                   defaults: OperatorDefaults = BUILTIN) -> kopf.OperatorRegistry:
    """A kopf registry with this operator's handlers bound to ``controller`` (the validating one if ``webhook``,
    checking resources resolved with ``defaults`` like the reconciler)."""
    registry = kopf.OperatorRegistry()
    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf's watches use the operator's own credentials (its --kubeconfig and --context, else in-cluster)."""
        found = credentials(config)
        token = found.pop("token", None)
        return kopf.ConnectionInfo(**{k: v for k, v in found.items() if v is not None},
                                   scheme="Bearer" if token else None, token=token)

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        await on_startup()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await on_cleanup()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def resource_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        if type == "DELETED":
            controller.resource_gone(key)
        else:
            controller.resource_seen(key, str(meta.get("uid")), int(meta.get("generation") or 0),
                                     force=bool(meta.get("deletionTimestamp")))

    @kopf.on.event("", "v1", "pods", labels={contract.L_NAME: contract.APP, contract.L_COMPONENT: contract.ENGINE},
                   registry=registry)
    async def engine_pod_event(body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata") or {}
        controller.trigger((meta.get("namespace"), (meta.get("labels") or {}).get(contract.L_INSTANCE)))

    @kopf.on.event("apps", "v1", "deployments",
                   labels={contract.L_NAME: contract.APP, contract.L_COMPONENT: contract.GATEWAY}, registry=registry)
    async def gateway_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        if type in ("DELETED", "MODIFIED"):
            meta = body.get("metadata") or {}
            controller.trigger((meta.get("namespace"), (meta.get("labels") or {}).get(contract.L_INSTANCE)))

    if webhook:

        @kopf.on.validate(GROUP, VERSION, PLURAL, id=HANDLER_ID, registry=registry)
        async def validate_resource(body: kopf.Body, old: Any, operation: str | None, **_: Any) -> None:
            message = admission_decision(dict(body), dict(old) if old else None, operation, defaults)
            if message is not None:
                raise kopf.AdmissionError(message, code=422)

    return registry
