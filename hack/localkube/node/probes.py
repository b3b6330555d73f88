"""Startup, readiness and liveness probes (httpGet, tcpSocket, exec) with the kubelet's timing semantics,
and lifecycle handlers (preStop/postStart) that use the same actions."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class ProbeTarget:
    """What a probe action runs against: the pod IP, the container's named ports, env and main pid."""

    pod_ip: str
    ports: dict[str, int]
    env: dict[str, str]
    pid: int | None = None


def _port(value: Any, target: ProbeTarget) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    if value in target.ports:
        return target.ports[value]
    raise ValueError(f"unknown named port {value!r}")


def run_action(action: dict[str, Any], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    """Run one probe/handler action; returns (success, message for events and logs)."""
    try:
        if "httpGet" in action:
            spec = action["httpGet"]
            scheme = (spec.get("scheme") or "HTTP").lower()
            host = spec.get("host") or target.pod_ip
            path = spec.get("path") or "/"
            url = f"{scheme}://{host}:{_port(spec.get('port'), target)}{path if path.startswith('/') else '/' + path}"
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/1.20")
            response = httpx.get(url, headers=headers, timeout=timeout, verify=False, trust_env=False)
            ok = 200 <= response.status_code < 400
            return ok, f"HTTP probe {url} returned {response.status_code}"
        if "tcpSocket" in action:
            spec = action["tcpSocket"]
            host = spec.get("host") or target.pod_ip
            port = _port(spec.get("port"), target)
            with socket.create_connection((host, port), timeout=timeout):
                return True, f"TCP {host}:{port} connected"
        if "exec" in action:
            command = list(action["exec"].get("command") or [])
            if target.pid:  # run inside the container's mount namespace, as `kubectl exec` would
                command = ["nsenter", "--mount", "--target", str(target.pid), "--", *command]
            result = subprocess.run(command, env=target.env, capture_output=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL, check=False)
            output = (result.stdout + result.stderr).decode(errors="replace").strip()[-300:]
            return result.returncode == 0, f"exec {command[-1] if command else ''} exited {result.returncode}: {output}"
        return False, f"unsupported probe action {sorted(action)}"
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout:g}s"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class Prober:
    """One probe of one container: keeps the kubelet's counters and timing.

    ``initialDelaySeconds`` counts from container start; results flip only after ``successThreshold``
    successes or ``failureThreshold`` failures in a row.
    """

    kind: str  # startup | readiness | liveness
    spec: dict[str, Any]
    started_at: float
    result: bool | None = None
    successes: int = 0
    failures: int = 0
    next_due: float = field(default=0.0)
    last_message: str = ""
    last_ok: bool = False

    def __post_init__(self) -> None:
        self.next_due = self.started_at + float(self.spec.get("initialDelaySeconds") or 0)

    @property
    def period(self) -> float:
        """Seconds between probes."""
        return float(self.spec.get("periodSeconds") or 10)

    @property
    def timeout(self) -> float:
        """Seconds one probe may take."""
        return float(self.spec.get("timeoutSeconds") or 1)

    def due(self, now: float) -> bool:
        """True when the next probe should run."""
        return now >= self.next_due

    def run(self, target: ProbeTarget, now: float | None = None) -> bool | None:
        """Probe once; returns the (possibly unchanged) result: True, False, or None while undecided."""
        ok, self.last_message = run_action(self.spec, target, self.timeout)
        self.last_ok = ok
        self.next_due = (now if now is not None else time.monotonic()) + self.period
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            threshold = 1 if self.kind != "readiness" else int(self.spec.get("successThreshold") or 1)
            if self.successes >= threshold:
                self.result = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.spec.get("failureThreshold") or 3):
                self.result = False
        return self.result

    def reset_due(self, now: float) -> None:
        """Probe again right away (used for readiness once startup has passed)."""
        self.next_due = min(self.next_due, now)
