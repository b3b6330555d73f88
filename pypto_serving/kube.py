"""The one Kubernetes client of the product: lightkube, with plain dict manifests in and out.

The operator's API calls (``Kube``, synchronous: its reconciles run in worker threads) and the gateway's pod
discovery (``ListWatch``, asyncio) both go through lightkube's clients and one credentials loader. The
operator's watches of its resources are kopf's (the framework's own client), the only other one.
Everything here is torch-free.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import httpx2
from lightkube import AsyncClient, Client, KubeConfig, codecs
from lightkube.core.exceptions import ApiError as LightkubeApiError
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.types import PatchType

log = logging.getLogger(__name__)

# Kinds lightkube's models do not know: created as generic resources (api_version, kind) -> (plural, namespaced).
GENERIC_KINDS = {("serving.pypto.io/v1alpha1", "PyptoServing"): ("pyptoservings", True)}


class ApiError(RuntimeError):
    """A non-2xx answer from the apiserver: ``status`` is its HTTP code, ``reason`` its message."""

    def __init__(self, status: int, reason: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {reason[:400]}")
        self.status = status
        self.reason = reason


def load_config(kubeconfig: str | None = None, context: str | None = None) -> KubeConfig:
    """In-cluster credentials when running in a pod (and no kubeconfig is given), else the kubeconfig file
    ($KUBECONFIG, else ~/.kube/config)."""
    config = KubeConfig.from_env() if kubeconfig is None else KubeConfig.from_file(kubeconfig)
    if context is not None:
        if context not in config.contexts:
            raise ValueError(f"the kubeconfig has no context {context!r} (it has {sorted(config.contexts)})")
        config.current_context = context
    return config


def credentials(config: KubeConfig) -> dict[str, Any]:
    """The current context's server and credentials as plain values (for a client that is not lightkube: kopf's
    watches). A token file is read again each call, so rotated service-account tokens are picked up."""
    single = config.get()
    cluster, user = single.cluster, single.user
    if user is not None and (user.exec or user.auth_provider):
        raise ValueError(f"context {single.context_name!r}: exec and auth-provider credentials are not supported; "
                         "use a token or a client certificate")
    out: dict[str, Any] = {"server": cluster.server, "insecure": cluster.insecure,
                           "ca_path": single.abs_file(cluster.certificate_auth) if cluster.certificate_auth else None,
                           "ca_data": base64.b64decode(cluster.certificate_auth_data)
                           if cluster.certificate_auth_data else None}
    if user is not None:
        token = user.token
        if user.token_file:
            token = Path(single.abs_file(user.token_file)).read_text().strip()
        out.update(token=token, username=user.username, password=user.password,
                   certificate_path=single.abs_file(user.client_cert) if user.client_cert else None,
                   certificate_data=base64.b64decode(user.client_cert_data) if user.client_cert_data else None,
                   private_key_path=single.abs_file(user.client_key) if user.client_key else None,
                   private_key_data=base64.b64decode(user.client_key_data) if user.client_key_data else None)
    return out


def equality_labels(selector: str) -> dict[str, str]:
    """``k=v,k2=v2`` (or ``==``) as a dict; ValueError names a term that is not an equality (``!=``, ``in``, ...),
    which this client does not pass on."""
    labels: dict[str, str] = {}
    for term in (t.strip() for t in selector.split(",")):
        key, sep, value = term.replace("==", "=").partition("=")
        if not term or not sep or not key or "!" in key or " " in key.strip() or "=" in value:
            raise ValueError(f"label selector term {term!r} is not key=value (only equality selectors are supported)")
        labels[key.strip()] = value.strip()
    return labels


@cache
def resource(api_version: str, kind: str) -> Any:
    """lightkube's resource class of ``kind`` in ``api_version`` (a generic one for our CRD)."""
    if (api_version, kind) in GENERIC_KINDS:
        plural, namespaced = GENERIC_KINDS[api_version, kind]
        group, _, version = api_version.rpartition("/")
        create = create_namespaced_resource if namespaced else create_global_resource
        return create(group, version, kind, plural)
    return resource_registry.load(api_version, kind)


def _plain(obj: Any) -> dict[str, Any]:
    return dict(obj) if isinstance(obj, dict) else obj.to_dict()


def _status_of(exc: httpx2.HTTPStatusError) -> tuple[int, str]:
    """(HTTP code, message) of a failed call or of a watch's ERROR event."""
    if isinstance(exc, LightkubeApiError) and exc.status is not None and exc.status.code:
        return int(exc.status.code), str(exc.status.message or "")
    return exc.response.status_code, exc.response.reason_phrase  # a watch's body is a stream, never read here


def _error(exc: LightkubeApiError, what: str) -> ApiError:
    status = exc.status
    return ApiError(int(status.code or exc.response.status_code), str(status.message or ""), what)


class Kube:
    """Synchronous client for one apiserver; safe to share between threads. Objects are plain dicts."""

    def __init__(self, config: KubeConfig, timeout: float = 30.0) -> None:
        self.client = Client(config, timeout=httpx2.Timeout(timeout), trust_env=False)

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return _plain(self.client.get(resource(api_version, kind), name, namespace=namespace))
        except LightkubeApiError as exc:
            if exc.status.code == 404:
                return None
            raise _error(exc, f"get {kind} {namespace}/{name}") from None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             labels: dict[str, str] | str | None = None, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The objects of a kind in ``namespace`` (None: all namespaces), optionally matching ``labels`` (a dict or
        an equality selector ``k=v,k2=v2``) and ``fields`` (e.g. ``{"spec.nodeName": "n1"}``)."""
        if isinstance(labels, str):
            labels = equality_labels(labels)
        try:
            return [_plain(obj) for obj in self.client.list(resource(api_version, kind), namespace=namespace or "*",
                                                            labels=labels, fields=fields)]
        except LightkubeApiError as exc:
            raise _error(exc, f"list {kind} in {namespace or 'all namespaces'}") from None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``; ApiError 409 when it exists."""
        try:
            return _plain(self.client.create(codecs.from_dict(obj)))
        except LightkubeApiError as exc:
            raise _error(exc, f"create {obj['kind']} {obj['metadata'].get('name')}") from None

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace ``obj`` (optimistic concurrency through metadata.resourceVersion: a stale one is a 409)."""
        try:
            return _plain(self.client.replace(codecs.from_dict(obj)))
        except LightkubeApiError as exc:
            raise _error(exc, f"replace {obj['kind']} {obj['metadata'].get('name')}") from None

    def merge_patch(self, api_version: str, kind: str, name: str, patch: dict[str, Any], namespace: str | None = None,
                    status: bool = False) -> dict[str, Any] | None:
        """JSON-merge-patch the object (or its status subresource); None when it does not exist."""
        res = resource(api_version, kind)
        try:
            return _plain(self.client.patch(res.Status if status else res, name, patch, namespace=namespace,
                                            patch_type=PatchType.MERGE))
        except LightkubeApiError as exc:
            if exc.status.code == 404:
                return None
            raise _error(exc, f"patch {kind} {namespace}/{name}") from None

    def apply(self, obj: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply ``obj`` (the whole desired object) as ``field_manager``, taking over conflicting fields
        (force): the object ends up with our value of every field we set."""
        try:
            return _plain(self.client.apply(codecs.from_dict(obj), field_manager=field_manager, force=True))
        except LightkubeApiError as exc:
            raise _error(exc, f"apply {obj['kind']} {obj['metadata'].get('name')}") from None

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        """Delete the object; a missing one is not an error."""
        try:
            self.client.delete(resource(api_version, kind), name, namespace=namespace)
        except LightkubeApiError as exc:
            if exc.status.code != 404:
                raise _error(exc, f"delete {kind} {namespace}/{name}") from None


class ListWatch:
    """Keeps a local view of the objects of a kind current: list, then watch from the list's resourceVersion;
    a lost or expired watch (410) lists again; failures retry with exponential backoff. ``on_list`` gets every
    object of each (re)list, ``on_event`` each watch event (type, object)."""

    def __init__(self, config: KubeConfig, api_version: str, kind: str, namespace: str | None,
                 labels: dict[str, str] | None, on_list: Callable[[Iterable[dict[str, Any]]], None],
                 on_event: Callable[[str, dict[str, Any]], None], watch_timeout_s: int = 300,
                 max_backoff_s: float = 30.0) -> None:
        self.client = AsyncClient(config, timeout=httpx2.Timeout(10.0, read=watch_timeout_s + 30.0), trust_env=False)
        self.res = resource(api_version, kind)
        self.namespace, self.labels = namespace, labels
        self.on_list, self.on_event = on_list, on_event
        self.watch_timeout_s, self.max_backoff_s = watch_timeout_s, max_backoff_s
        self.synced = asyncio.Event()  # set after the first list
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listing and watching in the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"list-watch-{self.res.__name__}")

    async def stop(self) -> None:
        """Stop and close the client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                listed = self.client.list(self.res, namespace=self.namespace, labels=self.labels)
                items = [_plain(obj) async for obj in listed]
                self.on_list(items)
                self.synced.set()
                backoff = 0.2
                async for kind, obj in self.client.watch(self.res, namespace=self.namespace, labels=self.labels,
                                                         resource_version=listed.resourceVersion,
                                                         server_timeout=self.watch_timeout_s):
                    self.on_event(kind, _plain(obj))
            except httpx2.HTTPStatusError as exc:  # lightkube's ApiError too (a watch ERROR event, a failed list)
                code, message = _status_of(exc)
                if code == 410:
                    log.info("watch of %s %r: resourceVersion gone, listing again", self.res.__name__, self.labels)
                    continue
                log.warning("list+watch of %s failed (HTTP %s: %s); again in %.1fs", self.res.__name__, code,
                            message[:300], backoff)
            except (httpx2.HTTPError, OSError, ValueError) as exc:
                log.warning("list+watch of %s failed (%r); again in %.1fs", self.res.__name__, exc, backoff)
            except Exception:  # a bug must not end the watch for good: say so loudly and start over
                log.exception("list+watch of %s failed unexpectedly; again in %.1fs", self.res.__name__, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
