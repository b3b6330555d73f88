"""Scale-down is a two-phase drain: a streamed request in flight on the victim completes before it is deleted.
The engines' /drain needs the resource's control token, which the operator sends and nobody else has; a drain
can be undone."""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from pypto_serving.operator.control import engine_token
from tests.operator.clusterkit import (
    CONTROL_KEY,
    OperatorProcess,
    engine_pods,
    kubectl_apply,
    resource,
    wait_ready,
)
from tests.support.common import wait_for

pytestmark = pytest.mark.cluster
TOKENS = 4000  # the tiny model makes ~300-1000 tokens/s here: several seconds of streaming


@dataclass
class Stream:
    """A streamed completion running in a thread."""

    url: str
    chunks: int = 0
    done: bool = False
    completion_tokens: int | None = None
    finished_at: float | None = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120, trust_env=False) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        self.done = True
                        break
                    chunk = json.loads(data)
                    self.chunks += 1
                    if chunk.get("usage"):
                        self.completion_tokens = chunk["usage"]["completion_tokens"]
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


def running(ip: str) -> int:
    return int(httpx.get(f"http://{ip}:8000/load", timeout=5, trust_env=False).json()["running"])


def control(method: str, ip: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, f"http://{ip}:8000/drain", headers=headers, timeout=10, trust_env=False)


def draining(ip: str) -> bool:
    return bool(httpx.get(f"http://{ip}:8000/load", timeout=5, trust_env=False).json()["draining"])


def test_scale_down_drains_the_victim_and_its_stream_completes(cluster: Any, namespace: str, kube: Any,
                                                               operator: OperatorProcess,
                                                               model_volume: dict[str, Any]) -> None:
    kubectl_apply(cluster, namespace, resource("drain", model_volume, replicas=2, drain={"timeoutSeconds": 120},
                                               engine={"maxModelLen": 4096}))
    wait_ready(kube, namespace, "drain", 2)
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in engine_pods(kube, namespace, "drain")}
    streams = {name: Stream(f"http://{ip}:8000").start() for name, ip in ips.items()}
    wait_for(lambda: all(running(ip) == 1 for ip in ips.values()), 60, "both streams running")

    # The control Secret: owned by the resource, holding the token the operator derives; no one else may drain.
    secret = kube.get("v1", "Secret", "drain-control", namespace)
    assert secret["metadata"]["ownerReferences"][0]["name"] == "drain"
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert token == engine_token(CONTROL_KEY, namespace, "drain")
    for ip in ips.values():
        assert control("POST", ip, None).status_code == 401
        assert control("POST", ip, "not-the-token").status_code == 403
        assert control("DELETE", ip, "not-the-token").status_code == 403
        assert not draining(ip)

    # Both replicas carry one request: the tie goes to the highest rank.
    cluster.kubectl("scale", "pps", "drain", "-n", namespace, "--replicas=1")
    deleted_at: list[float] = []

    def victim() -> dict[str, Any] | None:
        pods = {p["metadata"]["name"]: p for p in engine_pods(kube, namespace, "drain")}
        pod = pods.get("drain-dp-1")
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            deleted_at.append(time.monotonic())
            return None
        return pod

    labelled = wait_for(lambda: (victim() or {}).get("metadata", {}).get("labels", {}).get(
        "serving.pypto.io/draining") == "true", 30, "drain-dp-1 labelled draining")
    assert labelled and not streams["drain-dp-1"].done, "the stream ended before the drain began; use more tokens"
    pod = victim()
    assert pod is not None and "serving.pypto.io/drain-started" in pod["metadata"]["annotations"]
    # the engine stops admitting: a new request gets 503 while the old one keeps streaming
    refused = httpx.post(f"http://{ips['drain-dp-1']}:8000/v1/completions", timeout=10, trust_env=False,
                         json={"model": "tiny", "prompt": "late", "max_tokens": 2})
    assert refused.status_code == 503
    assert running(ips["drain-dp-1"]) == 1 and victim() is not None  # still there: work in flight

    wait_for(lambda: streams["drain-dp-1"].finished_at is not None, 120, "the victim's stream to finish")
    wait_for(lambda: victim() is None, 60, "drain-dp-1 deleted once idle")
    wait_for(lambda: all(s.finished_at is not None for s in streams.values()), 120, "every stream to finish")
    for name, stream in streams.items():
        assert stream.error is None, f"{name}: {stream.error!r}"
        assert stream.done and stream.completion_tokens == TOKENS, name
    assert deleted_at[0] >= streams["drain-dp-1"].finished_at  # type: ignore[operator]
    survivors = [p["metadata"]["name"] for p in engine_pods(kube, namespace, "drain", include_terminating=False)]
    assert survivors == ["drain-dp-0"]
    wait_ready(kube, namespace, "drain", 1)

    # A drain is undone with the same token: the pod turns unready, then Ready again, and serves.
    survivor = ips["drain-dp-0"]
    assert control("POST", survivor, token).status_code == 200 and draining(survivor)
    wait_for(lambda: not pod_ready(kube, namespace, "drain-dp-0"), 30, "drain-dp-0 unready while drained")
    assert control("DELETE", survivor, "not-the-token").status_code == 403 and draining(survivor)
    assert control("DELETE", survivor, token).status_code == 200 and not draining(survivor)
    wait_for(lambda: pod_ready(kube, namespace, "drain-dp-0"), 30, "drain-dp-0 Ready again")
    served = httpx.post(f"http://{survivor}:8000/v1/completions", timeout=30, trust_env=False,
                        json={"model": "tiny", "prompt": "back", "max_tokens": 2})
    assert served.status_code == 200


def pod_ready(kube: Any, namespace: str, name: str) -> bool:
    pod = kube.get("v1", "Pod", name, namespace) or {}
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])
