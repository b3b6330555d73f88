"""Fixtures and helpers shared by every test package (no cluster, no torch)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("PYPTO_CACHE_DIR", Path.home() / ".cache" / "pypto-serving"))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1,
             error: type[Exception] = AssertionError) -> object:
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass (then raise ``error`` naming
    ``what``); exceptions of the condition count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the condition may fail while the thing is coming up
            last_error = exc
        time.sleep(interval)
    raise error(f"timed out after {timeout:.0f}s waiting for {what}; last error: {last_error!r}")
