"""Replica discovery: a static endpoint list, or a Kubernetes list+watch of engine pods by label selector.

The Kubernetes watch talks to the API server directly with aiohttp (credentials from the in-cluster
ServiceAccount, else KUBECONFIG, through the official client's config loaders): it lists the pods, applies the
list as the whole replica set, then watches from the list's resourceVersion. A 410 Gone (or an ERROR event)
re-lists at once; any other failure reconnects with exponential back-off. Every event is applied as it
arrives, so a pod labelled draining stops receiving new requests with that one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from typing import Any
from urllib.parse import urlencode

import aiohttp

from pypto_serving.contract import ENGINE_PORT, ENGINE_PORT_NAME, ENV_POD_NAMESPACE, L_DRAINING, L_GROUP_READY, L_SERVES
from pypto_serving.gateway.replicas import Registry
from pypto_serving.gateway.upstream import Origin

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Discovery:
    """Keeps a registry's replica set current."""

    async def start(self, registry: Registry) -> None:
        """Fill ``registry`` and keep it current until ``stop``."""

    async def stop(self) -> None:
        """Stop updating."""


class StaticDiscovery(Discovery):
    """A fixed list of engine base URLs (each replica is named by its URL)."""

    def __init__(self, endpoints: list[str]) -> None:
        """ValueError names an endpoint that is not an http(s) URL."""
        self.endpoints = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        for url in self.endpoints:
            Origin(url)

    async def start(self, registry: Registry) -> None:
        registry.replace((url, url, "ready") for url in self.endpoints)


def pod_entry(pod: dict[str, Any], default_port: int = ENGINE_PORT) -> tuple[str, str, str] | None:
    """(name, url, state) of an engine pod, or None while it has no IP or does not serve (a worker of a multi-pod
    serving group). State is ``ready`` (eligible: Ready, Running, not terminating, not labelled draining, and
    in a multi-pod group, the group labelled Ready by the operator), ``draining``, ``terminating`` or
    ``not-ready``."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or labels.get(L_SERVES, "true").lower() == "false":
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == ENGINE_PORT_NAME and p.get("containerPort"):
                port = int(p["containerPort"])
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if meta.get("deletionTimestamp"):
        state = "terminating"
    elif labels.get(L_DRAINING, "").lower() == "true":
        state = "draining"
    elif not ready or status.get("phase") != "Running" or labels.get(L_GROUP_READY, "true").lower() != "true":
        state = "not-ready"
    else:
        state = "ready"
    host = f"[{ip}]" if ":" in ip else ip
    return meta.get("name", ip), f"http://{host}:{port}", state


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class KubernetesDiscovery(Discovery):
    """List+watch of the pods matching ``selector`` in ``namespace``."""

    def __init__(self, namespace: str | None, selector: str, kubeconfig: str | None = None,
                 default_port: int = ENGINE_PORT, watch_timeout_s: int = 300, max_backoff_s: float = 30.0) -> None:
        self.namespace = namespace or default_namespace()
        self.selector = selector
        self.kubeconfig = kubeconfig
        self.default_port = default_port
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self.synced = asyncio.Event()
        self.events = 0  # watch events applied (for tests and /replicas debugging)
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._cfg: Any = None

    # --- credentials ------------------------------------------------------------------------------------------
    def _load_config(self) -> Any:
        from kubernetes import client, config  # imported lazily: static mode never needs it

        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        return cfg

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self._cfg
        if not cfg.host.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _headers(self) -> dict[str, str]:
        """Request headers with the credentials the client config holds (the token re-read when it rotates)."""
        cfg = self._cfg
        headers = {"Accept": "application/json"}
        for setting in cfg.auth_settings().values():  # bearer token under 'BearerToken' or 'authorization'
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        if "authorization" not in {k.lower() for k in headers} and cfg.username:
            headers["Authorization"] = cfg.get_basic_auth_token()
        return headers

    # --- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, registry: Registry) -> None:
        self._cfg = await asyncio.to_thread(self._load_config)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()))
        self._task = asyncio.get_running_loop().create_task(self._run(registry))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.synced.wait(), timeout=10)  # serve after the first list when possible

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._session is not None:
            await self._session.close()

    # --- list + watch -----------------------------------------------------------------------------------------
    def _url(self, **params: Any) -> str:
        query = urlencode({"labelSelector": self.selector, **params})
        return f"{self._cfg.host.rstrip('/')}/api/v1/namespaces/{self.namespace}/pods?{query}"

    async def _run(self, registry: Registry) -> None:
        backoff = 0.2
        while True:
            try:
                version = await self._list(registry)
                backoff = 0.2
                while True:
                    version = await self._watch(registry, version)
            except Gone:
                log.info("watch of pods %r: resourceVersion gone, listing again", self.selector)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
                reason = repr(exc)
                if isinstance(exc, aiohttp.ClientResponseError):
                    reason = f"HTTP {exc.status}: {exc.message}"
                log.warning("pod discovery failed (%s); reconnecting in %.1fs", reason[:300], backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _list(self, registry: Registry) -> str:
        assert self._session is not None
        async with self._session.get(self._url(), headers=self._headers()) as resp:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=(await resp.text())[:200])
            data = await resp.json()
        entries = [e for e in (pod_entry(p, self.default_port) for p in data.get("items") or []) if e]
        registry.replace(entries)
        self.synced.set()
        return data["metadata"]["resourceVersion"]

    async def _watch(self, registry: Registry, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; return the last resourceVersion seen."""
        assert self._session is not None
        url = self._url(watch="1", resourceVersion=version, allowWatchBookmarks="true",
                        timeoutSeconds=str(self.watch_timeout_s))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.watch_timeout_s + 30)
        async with self._session.get(url, headers=self._headers(), timeout=timeout) as resp:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise Gone() if obj.get("code") == 410 else ValueError(f"watch error: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                self.apply(registry, kind, obj)
        return version

    def apply(self, registry: Registry, kind: str, pod: dict[str, Any]) -> None:
        """Apply one watch event to the registry."""
        self.events += 1
        name = (pod.get("metadata") or {}).get("name")
        entry = pod_entry(pod, self.default_port)
        if kind == "DELETED" or entry is None:
            if name:
                registry.remove(name)
            return
        registry.upsert(*entry)


def default_namespace() -> str:
    """The pod's own namespace ($POD_NAMESPACE or the ServiceAccount file), else ``default``."""
    if os.environ.get(ENV_POD_NAMESPACE):
        return os.environ[ENV_POD_NAMESPACE]
    with contextlib.suppress(OSError), open(SA_NAMESPACE_FILE) as f:
        return f.read().strip()
    return "default"
