"""Per-node device allocation (what a device plugin does) and loopback addresses for nodes and pods.

Each cluster claims a loopback /16, ``127.<octet>.0.0/16``, by holding an flock on a lock file for as long
as its node agent lives; nodes get ``127.<octet>.0.<n>`` and pods ``127.<octet>.<x>.<y>`` (x >= 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import threading
from pathlib import Path

LOCK_DIR = Path("/tmp/localkube-subnets")
OCTETS = range(16, 250)


class AllocationError(RuntimeError):
    """No devices or addresses left."""


def claim_subnet(cluster_dir: Path) -> tuple[int, int]:
    """Lock a free loopback /16 for this process's lifetime; returns (octet, lock fd). Prefers the last one used."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    remembered = cluster_dir / "pod-subnet-octet"
    candidates = list(OCTETS)
    random.shuffle(candidates)
    with contextlib.suppress(OSError, ValueError):
        candidates.insert(0, int(remembered.read_text()))
    for octet in candidates:
        fd = os.open(LOCK_DIR / f"127.{octet}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{cluster_dir}\n".encode())
        remembered.write_text(str(octet))
        return octet, fd
    raise AllocationError(f"every loopback /16 in 127.{OCTETS.start}-{OCTETS.stop - 1} is locked in {LOCK_DIR}")


class AddressPool:
    """Pod addresses inside one cluster's loopback /16, handed out round-robin so a freed one is reused last."""

    def __init__(self, octet: int) -> None:
        self.octet = octet
        self._lock = threading.Lock()
        self._by_pod: dict[str, str] = {}
        self._next = 0

    def node_ip(self, index: int) -> str:
        """Address of node ``index`` (1-based)."""
        return f"127.{self.octet}.0.{index}"

    def allocate(self, pod_uid: str, preferred: str | None = None) -> str:
        """Give ``pod_uid`` an address (the same one again if it has one; ``preferred`` if that is free)."""
        with self._lock:
            if pod_uid in self._by_pod:
                return self._by_pod[pod_uid]
            used = set(self._by_pod.values())
            if preferred and preferred.startswith(f"127.{self.octet}.") and preferred not in used \
                    and not preferred.startswith(f"127.{self.octet}.0."):
                self._by_pod[pod_uid] = preferred
                return preferred
            for _ in range(254 * 254):
                index = self._next
                self._next = (self._next + 1) % (254 * 254)
                address = f"127.{self.octet}.{1 + index // 254}.{1 + index % 254}"
                if address not in used:
                    self._by_pod[pod_uid] = address
                    return address
        raise AllocationError("no pod addresses left")

    def release(self, pod_uid: str) -> None:
        """Free the address of ``pod_uid``."""
        with self._lock:
            self._by_pod.pop(pod_uid, None)


class DevicePool:
    """The ``count`` devices of one node, ids 0..count-1, allocated per (pod, container)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._lock = threading.Lock()
        self._owner: dict[int, tuple[str, str]] = {}

    def allocate(self, pod_uid: str, container: str, wanted: int, preferred: list[int] | None = None) -> list[int]:
        """Allocate ``wanted`` distinct device ids (lowest free first, or ``preferred`` when all are free)."""
        with self._lock:
            mine = sorted(dev for dev, owner in self._owner.items() if owner == (pod_uid, container))
            if len(mine) == wanted:
                return mine
            free = [dev for dev in range(self.count) if dev not in self._owner]
            if preferred and len(preferred) == wanted and all(dev in free for dev in preferred):
                chosen = sorted(preferred)
            elif len(free) >= wanted:
                chosen = free[:wanted]
            else:
                raise AllocationError(f"{wanted} devices wanted, {len(free)} free of {self.count}")
            for dev in chosen:
                self._owner[dev] = (pod_uid, container)
            return chosen

    def release(self, pod_uid: str, container: str | None = None) -> None:
        """Free the devices of ``pod_uid`` (only ``container``'s when given)."""
        with self._lock:
            for dev in [dev for dev, owner in self._owner.items()
                        if owner[0] == pod_uid and container in (None, owner[1])]:
                del self._owner[dev]

    def in_use(self) -> int:
        """How many devices are allocated."""
        with self._lock:
            return len(self._owner)
