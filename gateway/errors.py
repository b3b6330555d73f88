"""OpenAI error envelopes: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from aiohttp import web

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 431: "invalid_request_error", 502: "upstream_error", 503: "service_unavailable",
         504: "upstream_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The JSON bytes of an error envelope."""
    error = {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def json_response(document: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer."""
    return web.Response(status=status, body=json.dumps(document).encode(), headers=headers,
                        content_type="application/json")


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An answer carrying an error envelope."""
    return web.Response(status=status, body=error_body(status, message, code, param), headers=headers,
                        content_type="application/json")
