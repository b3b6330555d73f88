"""The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` and everything that answers in it.

`APIError` is raised by the routes; FastAPI's own errors (validation, unknown routes, crashes) are translated into
it by the handlers `install_error_handlers` registers, and `BodyLimit` answers 413 before a route runs. Bad input
is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pypto_serving.engine.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("pypto_serving.engine")


class APIError(Exception):
    """An error answered in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: int | str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def unavailable(message: str, code: str, retry_after_s: int) -> APIError:
    """A 503 the client should retry (loading, draining, unhealthy, aborted, engine gone) with Retry-After."""
    return APIError(503, message, "service_unavailable", code=code, headers={"Retry-After": str(retry_after_s)})


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as a 400 naming the first offending field (a union's members named once)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    if not loc:
        return APIError(400, f"the request body must be a JSON object ({first.get('msg', 'invalid')})")
    # a value matching no member of a union (prompt, stop, content) fails once per member: name the members
    members = list(dict.fromkeys(str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and e["loc"][1] == loc[0]
                                 and not str(e["loc"][2]).isdigit()))
    if len(members) > 1:
        return APIError(400, f"{loc[0]}: expected one of {', '.join(members)}", param=loc[0])
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(400, f"{'.'.join(loc)}: {message}{more}", param=loc[0])


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app raises leave in the OpenAI envelope."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s: internal error", getattr(request.state, "request_id", "-"))
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").response()


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, judged from Content-Length before reading any of it and
    enforced while reading a chunked body (the excess is discarded, never buffered)."""

    DISCARD_LIMIT = 64 * 1024 * 1024  # beyond this the connection is simply closed after the 413

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.DISCARD_LIMIT:
                await self._discard(receive)
            await self._reject(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await self._discard(receive, size)
                await self._reject(send)
                return
            chunks.append(body)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, seen: int = 0) -> None:
        while seen <= self.DISCARD_LIMIT:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _reject(self, send: Send) -> None:
        error = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        body = error.response().body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
