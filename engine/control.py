"""Credentials of the engine's control endpoints (`POST /drain`, and `DELETE /drain` that undoes it).

The operator creates a Secret per PyptoServing, mounts it into the engine pods and passes its file as
``--control-token-file``; it sends the token as ``Authorization: Bearer <token>`` when it drains a replica.
Without that flag the control endpoints are disabled (403): an engine never accepts control requests from anyone
who can merely reach its port. The file is read again on every check, so a Secret the kubelet updates in place is
followed without a restart; comparisons take the same time whatever the presented token (hashes compared with
`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from pypto_serving.engine.api_errors import APIError

MAX_TOKEN_BYTES = 4096
_BEARER = "bearer "


def read_token(path: str | Path) -> bytes:
    """The token in ``path`` (surrounding whitespace removed); ValueError says why it is unusable."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the control token file {path}: {exc.strerror or exc}") from None
    token = raw.strip()
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"the control token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    if not token:
        raise ValueError(f"the control token file {path} is empty")
    return token


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ControlAuth:
    """Checks the bearer token of a control request against the token file (None: control disabled)."""

    def __init__(self, token_file: str | None) -> None:
        self.token_file = token_file

    @property
    def enabled(self) -> bool:
        return self.token_file is not None

    def check(self, authorization: str | None) -> None:
        """Return if ``authorization`` (the header's value) carries the token; else raise 401 or 403."""
        if self.token_file is None:
            raise APIError(403, "control endpoints are disabled: the engine was started without "
                           "--control-token-file", "permission_error", code="control_disabled")
        value = authorization or ""
        if value[:len(_BEARER)].lower() != _BEARER or not value[len(_BEARER):].strip():
            raise APIError(401, "control endpoints need `Authorization: Bearer <token>`", "authentication_error",
                           code="missing_token", headers={"WWW-Authenticate": 'Bearer realm="pypto-serving-engine"'})
        try:
            expected = read_token(self.token_file)
        except ValueError as exc:  # the mounted Secret went away: refuse rather than accept anything
            raise APIError(403, f"control endpoints are unavailable: {exc}", "permission_error",
                           code="control_disabled") from None
        presented = value[len(_BEARER):].strip().encode("latin-1", errors="replace")
        if not hmac.compare_digest(_digest(presented), _digest(expected)):
            raise APIError(403, "the control token is not valid", "permission_error", code="invalid_token")
