"""Side effects of a reconcile: Kubernetes API calls (pods, children, status, events) and engine HTTP calls.

Every operation is idempotent: creating a pod that exists, deleting one that is gone, labelling one that is
already draining are all no-ops, so a reconcile interrupted at any point can simply run again.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from pypto_serving import contract
from pypto_serving.contract import MANAGER, PATH_DRAIN, PATH_LOAD, LoadReport
from pypto_serving.kube import ApiError, Kube
from pypto_serving.operator import desired as d
from pypto_serving.operator.state import PodView, format_time
from pypto_serving.operator.types import API_VERSION, KIND

log = logging.getLogger("pypto_serving.operator.actuator")
COMPONENT = MANAGER  # the Events' source
GATEWAY_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
                 ("rbac.authorization.k8s.io/v1", "Role"), ("v1", "ServiceAccount"))
NETWORK_POLICY_KINDS = (("networking.k8s.io/v1", "NetworkPolicy"),)
# The server-side apply field manager of every object the operator writes from a desired manifest.
FIELD_MANAGER = MANAGER


class Actuator:
    """Applies decisions through the API and talks to engines over HTTP (pod IP, port 8000)."""

    def __init__(self, kube: Kube, http_timeout: float = 2.0, parallel: int = 8) -> None:
        self.kube = kube
        self.http = httpx.Client(timeout=http_timeout, trust_env=False)
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="actuator")
        self.instance = f"{socket.gethostname()}-{os.getpid()}"

    def close(self) -> None:
        """Release connections and threads."""
        self.http.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- observe -------------------------------------------------------------------------------------------------
    def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The PyptoServing, or None when it is gone."""
        return self.kube.get(API_VERSION, KIND, name, namespace)

    def list_resources(self, namespace: str | None) -> list[dict[str, Any]]:
        """All PyptoServings in a namespace (or the cluster)."""
        return self.kube.list(API_VERSION, KIND, namespace)

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The engine pods of one resource (by label)."""
        return self.kube.list("v1", "Pod", namespace, labels=d.engine_selector(name))

    def _load(self, pod: PodView) -> tuple[str, LoadReport | None]:
        try:
            response = self.http.get(f"http://{pod.ip}:{contract.ENGINE_PORT}{PATH_LOAD}")
            response.raise_for_status()
            return pod.name, LoadReport.parse(response.json())
        except httpx.ConnectError:
            return pod.name, LoadReport()  # nothing listens: no request can be in flight there
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("GET /load of %s failed: %r", pod.name, exc)
            return pod.name, None

    def fetch_loads(self, pods: Sequence[PodView]) -> dict[str, LoadReport]:
        """`GET /load` of each pod, concurrently; pods that time out or fail are left out (unknown load), pods
        where nothing listens count as idle."""
        if not pods:
            return {}
        results = self.pool.map(self._load, pods) if len(pods) > 1 else map(self._load, pods)
        return {name: load for name, load in results if load is not None}

    # --- engine pods ---------------------------------------------------------------------------------------------
    def create_pod(self, manifest: dict[str, Any]) -> bool:
        """Create an engine pod; False if a pod of that name already exists."""
        return self._create_once(manifest)

    def create_pods(self, manifests: Sequence[dict[str, Any]]) -> list[bool]:
        """Create several pods concurrently (scale-up latency)."""
        if len(manifests) <= 1:
            return [self.create_pod(m) for m in manifests]
        return list(self.pool.map(self.create_pod, manifests))

    def start_drain(self, namespace: str, pod: str, reason: str, ip: str | None, now: float, restamp: bool,
                    token: str) -> None:
        """Label the pod draining (the gateway stops routing to it) and `POST /drain` to its engine with the
        resource's control token."""
        if restamp:
            annotations = {contract.A_DRAIN_STARTED: format_time(now), contract.A_DRAIN_REASON: reason}
            patch = {"metadata": {"labels": {contract.L_DRAINING: "true"}, "annotations": annotations}}
            self.kube.merge_patch("v1", "Pod", pod, patch, namespace)
        if ip:
            try:
                response = self.http.post(f"http://{ip}:{contract.ENGINE_PORT}{PATH_DRAIN}",
                                          headers={contract.AUTHORIZATION_HEADER: f"Bearer {token}"})
                if response.status_code in (401, 403):  # a Secret not ours, or another operator's key
                    log.warning("the engine of %s refused the operator's drain token (%d): the gateway still stops "
                                "routing to it (draining label)", pod, response.status_code)
                response.raise_for_status()
            except httpx.HTTPError as exc:  # retried by the next reconcile (the load shows draining=false)
                log.info("POST /drain to %s failed: %r", pod, exc)

    def create_control_secret(self, manifest: dict[str, Any]) -> bool:
        """Create a resource's control Secret; False if one of that name exists (it is never read, changed or
        deleted: RBAC gives the operator ``create`` on Secrets and nothing else)."""
        return self._create_once(manifest)

    def _create_once(self, manifest: dict[str, Any]) -> bool:
        """Create ``manifest``; False (not an error) when an object of that name already exists."""
        try:
            self.kube.create(manifest)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def label_pod(self, namespace: str, pod: str, key: str, value: str, annotation: bool = False) -> None:
        """Set one label (or annotation) on a pod (gone already is fine)."""
        section = "annotations" if annotation else "labels"
        self.kube.merge_patch("v1", "Pod", pod, {"metadata": {section: {key: value}}}, namespace)

    def delete_pod(self, namespace: str, pod: str) -> None:
        """Delete a pod (gone already is fine)."""
        self.kube.delete("v1", "Pod", pod, namespace)

    # --- children ------------------------------------------------------------------------------------------------
    def apply(self, obj: dict[str, Any], owner_uid: str) -> str:
        """Server-side apply a child as FIELD_MANAGER, forcing our fields back (a hand edit of a field we set is
        reverted on the next reconcile); returns applied, or conflict when an object of that name exists that
        this resource does not own (it is left alone)."""
        meta = obj["metadata"]
        current = self.kube.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        if current is not None:
            refs = (current.get("metadata") or {}).get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                return "conflict"
        self.kube.apply(obj, FIELD_MANAGER)
        return "applied"

    def delete_gateway(self, namespace: str, name: str, owner_uid: str) -> int:
        """Delete the gateway objects of a resource whose gateway was disabled; returns how many."""
        return self.delete_owned(namespace, d.gateway_name(name), GATEWAY_KINDS, owner_uid)

    def delete_owned(self, namespace: str, name: str, kinds: Sequence[tuple[str, str]], owner_uid: str) -> int:
        """Delete the objects ``name`` of these (apiVersion, kind)s that this resource owns; returns how many."""
        deleted = 0
        for api_version, kind in kinds:
            current = self.kube.get(api_version, kind, name, namespace)
            refs = ((current or {}).get("metadata") or {}).get("ownerReferences") or []
            if current is not None and any(ref.get("uid") == owner_uid for ref in refs):
                self.kube.delete(api_version, kind, name, namespace)
                deleted += 1
        return deleted

    # --- status and events ---------------------------------------------------------------------------------------
    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists are replaced whole; None removes a field)."""
        self.kube.merge_patch(API_VERSION, KIND, name, {"status": status}, namespace, status=True)

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str, now: float) -> None:
        """Post a Kubernetes Event about the PyptoServing (failures to post are only logged)."""
        meta = body.get("metadata") or {}
        stamp = format_time(now)
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta.get("name"),
                               "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": self.instance,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.kube.create(event)
        except Exception as exc:
            log.warning("could not post event %s on %s: %r", reason, meta.get("name"), exc)
