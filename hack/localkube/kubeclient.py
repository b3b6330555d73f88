"""A small Kubernetes REST client over httpx (plain dicts in and out; list+watch with resume).

The node agent uses it instead of the generated ``kubernetes`` client to keep CPU use low on small machines.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Credentials:
    """How to reach the apiserver: URL, CA bundle and a client certificate."""

    server: str
    ca_file: Path
    cert_file: Path
    key_file: Path


class KubeClient:
    """Thread-safe JSON client for one apiserver."""

    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        context = ssl.create_default_context(cafile=str(creds.ca_file))
        context.load_cert_chain(str(creds.cert_file), str(creds.key_file))
        self.server = creds.server.rstrip("/")
        self._ssl = context
        self._http = httpx.Client(base_url=self.server, verify=context, timeout=timeout, trust_env=False)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                content_type: str = "application/json", ok_missing: bool = False) -> dict[str, Any] | None:
        """Send one request; returns the decoded JSON, or None for a 404 when ``ok_missing``."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        response = self._http.request(method, path, content=data, params=params, headers=headers)
        if response.status_code == 404 and ok_missing:
            return None
        if response.status_code >= 300:
            raise ApiError(response.status_code, response.text, f"{method} {path}")
        if not response.content:
            return {}
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return {"text": response.text}

    def get(self, path: str, ok_missing: bool = False, **params: Any) -> dict[str, Any] | None:
        """GET ``path``."""
        return self.request("GET", path, params=params or None, ok_missing=ok_missing)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the collection ``path``."""
        result = self.request("POST", path, body=body)
        assert result is not None
        return result

    def merge_patch(self, path: str, body: dict[str, Any], ok_missing: bool = False) -> dict[str, Any] | None:
        """JSON-merge-patch ``path`` (lists in ``body`` replace the stored ones)."""
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json",
                            ok_missing=ok_missing)

    def strategic_patch(self, path: str, body: dict[str, Any], ok_missing: bool = False) -> dict[str, Any] | None:
        """Strategic-merge-patch ``path`` (lists merge by their key, e.g. conditions by type)."""
        return self.request("PATCH", path, body=body, content_type="application/strategic-merge-patch+json",
                            ok_missing=ok_missing)

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """DELETE ``path``; a missing object is not an error."""
        return self.request("DELETE", path, body=body, ok_missing=True)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300,
              **params: Any) -> Iterator[dict[str, Any]]:
        """Yield watch events ``{"type", "object"}`` from ``resource_version`` until the server closes the stream."""
        query = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds), **params}
        timeout = httpx.Timeout(30.0, read=timeout_seconds + 30.0)
        with self._http.stream("GET", path, params=query, timeout=timeout) as response:
            if response.status_code >= 300:
                response.read()
                raise ApiError(response.status_code, response.text, f"WATCH {path}")
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)


def list_and_watch(client: KubeClient, path: str, stop: Any, **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("SYNC", list)``-style events: first ``("ADDED", obj)`` for every listed object, then watch events.

    Relists after an expired resource version (410) and retries with a pause on connection errors, until
    ``stop.is_set()``. After a relist, a ``("RELISTED", {"names": set of uids})`` event lets the caller drop
    objects that vanished while the watch was down.
    """
    while not stop.is_set():
        try:
            listed = client.get(path, **params)
            assert listed is not None
            version = listed["metadata"]["resourceVersion"]
            uids = set()
            for item in listed.get("items", []):
                uids.add(item["metadata"]["uid"])
                yield "ADDED", item
            yield "RELISTED", {"uids": uids}
            while not stop.is_set():
                for event in client.watch(path, version, **params):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise _Relist
                        raise ApiError(obj.get("code", 500), json.dumps(obj), f"WATCH {path}")
                    version = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        yield kind, obj
        except _Relist:
            continue
        except (httpx.HTTPError, ApiError, OSError) as exc:
            if stop.is_set():
                return
            print(f"watch {path} interrupted ({exc!r}); relisting in 1s", flush=True)
            time.sleep(1)


class _Relist(Exception):
    pass
