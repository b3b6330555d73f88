"""Leader election with a coordination.k8s.io/v1 Lease (client-go semantics), so two operator replicas are safe.

Only the holder of the Lease reconciles; the others watch, serve the webhook and wait. The holder renews
every ``retry_period``; a standby takes the Lease over once ``renewTime + leaseDurationSeconds`` has passed
(the holder died), or at once when the holder released it on a clean shutdown. Writes use the Lease's
resourceVersion, so two candidates can never both win the same round.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pypto_serving.contract import ENV_POD_NAME
from pypto_serving.kube import ApiError, Kube

LEASE_API = "coordination.k8s.io/v1"

log = logging.getLogger("pypto_serving.operator.leader")


def micro_time(epoch: float) -> str:
    """Kubernetes MicroTime."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: str | None) -> float | None:
    """MicroTime (or Time) -> epoch seconds."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def identity(environ: Mapping[str, str] | None = None, hostname: str | None = None, pid: int | None = None,
             suffix: str | None = None) -> str:
    """This process's Lease holder identity: ``<pod>_<suffix>`` from ``$POD_NAME`` (the downward API) in a pod,
    else ``<hostname>_<pid>_<suffix>``; ``suffix`` is a fresh short uuid4, so two processes never share one.

    The hostname alone would not do: on the local cluster every pod runs on the same host (same hostname), and
    a restarted operator must not look like the one that held the Lease before it.
    """
    env = os.environ if environ is None else environ
    suffix = suffix or uuid.uuid4().hex[:8]
    pod = env.get(ENV_POD_NAME, "").strip()
    if pod:
        return f"{pod}_{suffix}"
    return f"{hostname or socket.gethostname()}_{pid if pid is not None else os.getpid()}_{suffix}"


@dataclass(frozen=True)
class Decision:
    """What a candidate does with the Lease it read: nothing, create it, or write it (renew or take over)."""

    action: str  # "none" | "create" | "update"
    lease: dict[str, Any] | None
    leading: bool


def decide(lease: dict[str, Any] | None, identity: str, now: float, duration: int, namespace: str,
           name: str) -> Decision:
    """Pure: given the current Lease (None if absent), what this candidate should write."""
    stamp = micro_time(now)
    if lease is None:
        body = {"apiVersion": LEASE_API, "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration, "acquireTime": stamp,
                         "renewTime": stamp, "leaseTransitions": 0}}
        return Decision("create", body, True)
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    renewed = parse_micro_time(spec.get("renewTime")) or 0.0
    held_for = int(spec.get("leaseDurationSeconds") or duration)
    body = copy.deepcopy(lease)
    new_spec = body.setdefault("spec", {})
    if holder == identity:
        new_spec.update(renewTime=stamp, leaseDurationSeconds=duration)
        return Decision("update", body, True)
    if holder and now < renewed + held_for:
        return Decision("none", None, False)
    new_spec.update(holderIdentity=identity, leaseDurationSeconds=duration, acquireTime=stamp, renewTime=stamp,
                    leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
    return Decision("update", body, True)


class LeaderElector:
    """Keeps trying to hold the Lease; ``leading`` tells whether this replica may reconcile now."""

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, lease_duration: int = 15,
                 retry_period: float = 2.0, on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration, self.retry_period = lease_duration, retry_period
        self.on_change = on_change
        self.clock = clock
        self.leading = False
        self._last_renew = 0.0
        self._changed = asyncio.Event()

    def try_acquire_or_renew(self) -> bool:
        """One round (blocking API calls): returns whether this replica holds the Lease now."""
        now = self.clock()
        try:
            lease = self.kube.get(LEASE_API, "Lease", self.name, self.namespace)
            decision = decide(lease, self.identity, now, self.lease_duration, self.namespace, self.name)
            if decision.action == "create" and decision.lease is not None:
                self.kube.create(decision.lease)
            elif decision.action == "update" and decision.lease is not None:
                self.kube.replace(decision.lease)
            if decision.leading:
                self._last_renew = now
            return decision.leading
        except ApiError as exc:
            if exc.status not in (409, 422):
                log.warning("leader election round failed: %s", exc)
        except Exception as exc:  # the apiserver may be briefly unreachable
            log.warning("leader election round failed: %r", exc)
        # Without a successful renewal, keep leading only until our own lease would have expired.
        return self.leading and now < self._last_renew + self.lease_duration - self.retry_period

    def release(self) -> None:
        """Give the Lease up (clean shutdown) so a standby takes over at once."""
        if not self.leading:
            return
        try:
            lease = self.kube.get(LEASE_API, "Lease", self.name, self.namespace)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                self.kube.replace(lease)
                log.info("released the leader lease %s/%s", self.namespace, self.name)
        except Exception as exc:
            log.warning("could not release the leader lease: %r", exc)
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            log.info("%s the leader lease %s/%s as %s", "acquired" if leading else "lost", self.namespace,
                     self.name, self.identity)
            self._changed.set()
            if self.on_change is not None:
                self.on_change(leading)

    async def run(self) -> None:
        """Election loop (until cancelled)."""
        while True:
            leading = await asyncio.to_thread(self.try_acquire_or_renew)
            self._set(leading)
            await asyncio.sleep(self.retry_period)

    async def wait_leading(self) -> None:
        """Return once this replica leads."""
        while not self.leading:
            self._changed.clear()
            await self._changed.wait()
