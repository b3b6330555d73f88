"""The gateway's client-facing HTTP/1.1 server: aiohttp's low-level server, bounded everywhere a client could hold
the gateway's memory, sockets or time.

aiohttp parses requests in C (llhttp) and already bounds the request line, each header line and the header count
(-> 431), answers pipelined requests one at a time with a bounded queue of parsed requests, closes a connection
whose first request head does not complete within the keep-alive timeout (and an idle one after it), and cancels
the handler of a client that disconnects (which closes its upstream request, so the engine aborts it). This
module adds what a reverse proxy in front of expensive engines needs on top:

* a connection cap: a connection over ``max_connections`` gets a 503 and is closed at once;
* request bodies bounded by size (413, from Content-Length before a byte is read, or as they arrive) and by time:
  the whole body must arrive within ``body_timeout_s`` plus one second per ``body_min_rate`` bytes (408), read
  into one bytearray (a body of tiny chunks costs its size, not an object per chunk);
* a send timeout: a client that takes no data for ``send_timeout_s`` while the gateway writes to it is cut;
* every answer of its own, malformed requests included, in the OpenAI error envelope;
* a bounded shutdown: answers in flight may finish within the grace period, then every connection is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from pypto_serving.gateway.errors import error_body, error_response

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # aiohttp depends on async-timeout below 3.11
    from async_timeout import timeout as deadline

log = logging.getLogger("pypto_serving.gateway")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A write that leaves less than this buffered cannot make the transport pause (asyncio's and uvloop's high-water
# mark is 64 KiB), so it cannot wait for the client.
NO_WAIT_BYTES = 16 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """What one client may cost the gateway (the CLI's defaults)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_headers: int = 100  # header lines per request
    max_field_bytes: int = 8190  # the request line, and each header line
    keepalive_s: float = 30.0  # an idle connection, or a request head that does not complete, is closed after this
    body_timeout_s: float = 30.0  # the body must arrive within this ...
    body_min_rate: int = 64 * 1024  # ... plus one second per this many bytes of it
    send_timeout_s: float = 60.0  # a client that takes nothing for this long while written to is cut
    max_connections: int = 4096
    linger_s: float = 2.0  # after answering a request whose body is unread: how long the rest is read and dropped


class RequestRefused(Exception):
    """A request the server answers itself (its body is too large or too slow)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class SendTimeout(ConnectionResetError):
    """The client took no data for the send timeout; its connection was cut."""


class Connection(RequestHandler):
    """aiohttp's per-connection protocol with the gateway's error answers (OpenAI envelopes, 431 for heads over
    the limits) for requests that never reach a handler."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client went away, or was cut: nobody to answer
            raise exc
        if request.writer.output_size > 0:  # part of an answer went out: the connection can only be cut
            raise ConnectionError("the answer was already started")
        code = "bad_request"
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "header" in str(exc).lower()):
            status, code, message = 431, "request_header_fields_too_large", f"request head over the limits: {exc}"
        elif status == 500:
            log.error("handler failed on %s %s", request.method, request.path, exc_info=exc)
            code, message = "internal_error", "internal gateway error"
        else:
            message = f"malformed HTTP request: {exc or message}"
        response = error_response(status, message, code=code)
        response.force_close()
        return response


class Refused(asyncio.Protocol):
    """A connection over the cap: one 503 and close, without reading the request."""

    ANSWER = error_body(503, "too many client connections", code="too_many_connections")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                        b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(self.ANSWER), self.ANSWER))
        transport.close()


class Server(web.Server):
    """aiohttp's low-level server with a connection cap, serving one handler; `listen`, then `shutdown`."""

    def __init__(self, handler: Handler, limits: ServerLimits) -> None:
        super().__init__(handler, handler_cancellation=True, keepalive_timeout=limits.keepalive_s,
                         max_line_size=limits.max_field_bytes, max_field_size=limits.max_field_bytes,
                         max_headers=limits.max_headers, lingering_time=limits.linger_s, access_log=None,
                         auto_decompress=False)
        self.limits = limits
        self.refused = 0
        self._listener: asyncio.base_events.Server | None = None

    def __call__(self) -> Any:
        """A protocol for a new connection: a `Connection`, or `Refused` over the cap."""
        if len(self._connections) >= self.limits.max_connections:
            self.refused += 1
            return Refused()
        return Connection(self, loop=self._loop, **self._kwargs)

    async def listen(self, host: str, port: int, backlog: int = 4096) -> int:
        """Start accepting connections; returns the port (``port`` 0: an ephemeral one)."""
        self._listener = await self._loop.create_server(self, host, port, backlog=backlog)
        return self._listener.sockets[0].getsockname()[1]

    async def shutdown(self, timeout: float | None = None) -> None:  # type: ignore[override]
        """Stop accepting, close idle connections, let answers in flight finish for up to ``timeout`` seconds, then
        cut every connection left."""
        if self._listener is not None:
            self._listener.close()
        grace = 0.0 if timeout is None else timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(super().shutdown(grace), grace + 1.0)
        for connection, transport in list(self._connections.items()):
            transport.abort()
            self._connections.pop(connection, None)


async def read_body(request: web.BaseRequest, limits: ServerLimits) -> bytes:
    """The whole request body within the limits, else `RequestRefused` (413 too large, 408 too slow): a declared
    length over the limit is refused before a byte is read; ``Expect: 100-continue`` is answered once it passed."""
    length = request.content_length
    if length is not None and length > limits.max_body_bytes:
        raise RequestRefused(413, f"request body over {limits.max_body_bytes} bytes", "body_too_large")
    content = request.content
    if content.at_eof():
        return b""
    if (request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue"
            and request.transport is not None):
        request.transport.write(CONTINUE)  # not through the answer's writer: this is no part of the answer
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunk = content.read_nowait()
    if content.at_eof() and len(chunk) <= limits.max_body_bytes:  # the common case: it came with the head
        return chunk
    body = bytearray(chunk)
    while len(body) <= limits.max_body_bytes:
        if content.at_eof():
            return bytes(body)
        chunk = content.read_nowait()
        if not chunk:
            remaining = started + limits.body_timeout_s + len(body) / limits.body_min_rate - loop.time()
            if remaining <= 0:
                raise RequestRefused(408, "request body too slow", "body_timeout")
            try:
                async with deadline(remaining):
                    chunk = await content.readany()
            except asyncio.TimeoutError:
                raise RequestRefused(408, "request body too slow", "body_timeout") from None
        body += chunk
    raise RequestRefused(413, f"request body over {limits.max_body_bytes} bytes", "body_too_large")


def refusal(error: RequestRefused) -> web.Response:
    """The answer to a refused request; the connection closes after it (its body may be unread)."""
    response = error_response(error.status, error.message, code=error.code)
    response.force_close()
    return response


async def send(request: web.BaseRequest, response: web.StreamResponse, data: bytes, send_timeout_s: float,
               last: bool = False) -> None:
    """Write ``data`` (``last``: and end the answer), preparing the answer first; a client that takes nothing for
    ``send_timeout_s`` meanwhile is cut (`SendTimeout`). A write that cannot wait (the client's socket takes data
    and this one is small) sets no timer."""
    transport = request.transport
    if (transport is not None and not request.protocol.writing_paused
            and transport.get_write_buffer_size() + len(data) + _head_size(response) < NO_WAIT_BYTES):
        await _write(request, response, data, last)
        return
    try:
        async with deadline(send_timeout_s):
            await _write(request, response, data, last)
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise SendTimeout(f"the client took no data for {send_timeout_s:g}s") from None


def _head_size(response: web.StreamResponse) -> int:
    """Bytes of the head still to be written (an upper bound; 0 once it went out)."""
    if response.prepared:
        return 0
    return 64 + sum(len(k) + len(v) + 4 for k, v in response.headers.items())


async def _write(request: web.BaseRequest, response: web.StreamResponse, data: bytes, last: bool) -> None:
    if not response.prepared:
        await response.prepare(request)
    if last:
        await response.write_eof(data)
    elif data:
        await response.write(data)
