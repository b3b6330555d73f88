"""A thin, thread-safe Kubernetes REST client over httpx: plain dicts in and out.

Credentials come from the kubeconfig (``KUBECONFIG``) or the in-cluster service account, parsed by the
official ``kubernetes`` package's loaders; requests go through one pooled ``httpx.Client``.
"""

from __future__ import annotations

import json
import ssl
import threading
from typing import Any

import httpx
from kubernetes import config as kube_config
from kubernetes.client import Configuration


class ApiError(RuntimeError):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:400]}")
        self.status = status
        self.body = body

    @property
    def reason(self) -> str:
        """The apiserver's Status message, when there is one."""
        try:
            return str(json.loads(self.body).get("message") or self.body)
        except ValueError:
            return self.body


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> Configuration:
    """In-cluster credentials when running in a pod (and no kubeconfig is given), else the kubeconfig."""
    cfg = Configuration()
    if kubeconfig is None:
        try:
            kube_config.load_incluster_config(client_configuration=cfg)
            return cfg
        except kube_config.ConfigException:
            pass
    kube_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return cfg


class Kube:
    """JSON client for one apiserver; safe to share between threads."""

    def __init__(self, cfg: Configuration, timeout: float = 30.0, pool: int = 16) -> None:
        self._cfg = cfg
        self._lock = threading.Lock()
        verify: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else True
        if isinstance(verify, ssl.SSLContext) and cfg.cert_file and cfg.key_file:
            verify.load_cert_chain(cfg.cert_file, cfg.key_file)
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self.server = cfg.host.rstrip("/")
        self._http = httpx.Client(base_url=self.server, verify=verify, timeout=timeout, limits=limits,
                                  trust_env=False)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _auth(self) -> dict[str, str]:
        with self._lock:
            cfg = self._cfg
            if cfg.refresh_api_key_hook is not None:
                cfg.refresh_api_key_hook(cfg)  # re-reads rotated service-account tokens
            api_key = dict(cfg.api_key or {})
            prefixes = dict(cfg.api_key_prefix or {})
        for key in ("authorization", "BearerToken"):
            token = api_key.get(key)
            if token:
                prefix = prefixes.get(key) or "Bearer"
                if not token.lower().startswith(prefix.lower() + " "):
                    token = f"{prefix} {token}"
                return {"Authorization": token}
        return {}

    def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                content_type: str = "application/json", ok_missing: bool = False,
                timeout: float | None = None) -> dict[str, Any] | None:
        """Send one request; the decoded JSON, or None for a 404 when ``ok_missing``."""
        headers = {"Accept": "application/json", **self._auth()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        response = self._http.request(method, path, content=data, params=params, headers=headers,
                                      timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        if response.status_code == 404 and ok_missing:
            return None
        if response.status_code >= 300:
            raise ApiError(response.status_code, response.text, f"{method} {path}")
        return response.json() if response.content else {}

    def get(self, path: str, ok_missing: bool = False, **params: Any) -> dict[str, Any] | None:
        """GET ``path``."""
        return self.request("GET", path, params=params or None, ok_missing=ok_missing)

    def list(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """GET a collection; its items."""
        result = self.request("GET", path, params=params or None)
        return list((result or {}).get("items") or [])

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the collection ``path``."""
        return self.request("POST", path, body=body) or {}

    def merge_patch(self, path: str, body: dict[str, Any], ok_missing: bool = False) -> dict[str, Any] | None:
        """JSON-merge-patch ``path`` (lists in ``body`` replace the stored ones; None deletes a key)."""
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json",
                            ok_missing=ok_missing)

    def apply(self, path: str, body: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply ``body`` (the whole desired object) to ``path`` as ``field_manager``, taking over
        conflicting fields (force): the object ends up with our value of every field we set."""
        return self.request("PATCH", path, body=body, content_type="application/apply-patch+yaml",
                            params={"fieldManager": field_manager, "force": "true"}) or {}

    def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT ``body`` (optimistic concurrency through metadata.resourceVersion)."""
        return self.request("PUT", path, body=body) or {}

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """DELETE ``path``; a missing object is not an error."""
        return self.request("DELETE", path, body=body, ok_missing=True)


def collection_path(api_version: str, kind_plural: str, namespace: str | None) -> str:
    """REST path of a collection, e.g. ``/api/v1/namespaces/ns/pods``."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{kind_plural}" if namespace else f"{base}/{kind_plural}"


PLURALS = {"Pod": "pods", "Service": "services", "ServiceAccount": "serviceaccounts", "Role": "roles",
           "RoleBinding": "rolebindings", "Deployment": "deployments", "Event": "events", "Secret": "secrets",
           "Lease": "leases", "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
           "NetworkPolicy": "networkpolicies"}


def object_path(obj: dict[str, Any]) -> tuple[str, str]:
    """(collection path, object path) of a manifest."""
    meta = obj["metadata"]
    collection = collection_path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"))
    return collection, f"{collection}/{meta['name']}"
