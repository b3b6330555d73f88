"""The token an engine's control endpoints (`POST /drain`, `DELETE /drain`) require, shared by the operator and
the engine pods of one PyptoServing.

The token is derived, not stored: HMAC-SHA256 of ``<namespace>/<name>`` under the operator's control key
(``--control-key-file``; the chart keeps the key in a Secret of its own and mounts it). So the operator never reads
a Secret through the API: it creates each resource's ``<name>-control`` Secret (RBAC ``create`` only, which cannot
read anything back) and computes the token again whenever it drains. Any operator replica with the same key, and
the same replica after a restart, derives the same token. Without a key file the operator makes a random key for
its own lifetime (local runs): engines created by another operator process then refuse its drains.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

log = logging.getLogger("pypto_serving.operator.control")
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096


def load_key(path: str | Path | None) -> bytes:
    """The control key in ``path`` (whitespace around it removed), or a random one when ``path`` is None;
    ValueError says why a file is unusable."""
    if path is None:
        log.warning("no --control-key-file: using a random control key; engine pods created by another operator "
                    "process (or before a restart) will refuse this one's drains")
        return secrets.token_bytes(MIN_KEY_BYTES)
    try:
        raw = Path(path).read_bytes()[:MAX_KEY_BYTES + 1]
    except OSError as exc:
        raise ValueError(f"cannot read the control key file {path}: {exc.strerror or exc}") from None
    key = raw.strip()
    if len(raw) > MAX_KEY_BYTES or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the control key file {path} must hold {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes "
                         f"(e.g. `head -c 48 /dev/urandom | base64`)")
    return key


def engine_token(key: bytes, namespace: str, name: str) -> str:
    """The control token of the PyptoServing ``namespace/name`` (64 hex characters)."""
    return hmac.new(key, f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()
