"""OpenAI error envelopes: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from pypto_serving.gateway.http_server import Answer

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         431: "invalid_request_error", 502: "upstream_error", 503: "service_unavailable", 504: "upstream_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The JSON bytes of an error envelope."""
    error = {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Answer:
    """An answer carrying an error envelope."""
    return Answer(status, error_body(status, message, code, param), list((headers or {}).items()),
                  content_type="application/json")
