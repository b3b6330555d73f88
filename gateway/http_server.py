"""The gateway's HTTP/1.1 server towards its clients: an asyncio Protocol fed to httptools' request parser.

A reverse proxy's CPU per request is mostly the layers between two sockets; at concurrency 32 the requests of one
engine step reach the gateway together and leave it one after another, so each microsecond is paid 32 times.
This server does what the gateway needs and nothing else: requests are parsed in C, read whole (body limit ->
413, head limit -> 431, bad framing -> 400, all as OpenAI error envelopes from the app's ``reject``), handed to
one handler (which answers at once, from a task, or from callbacks), and answered either sized in one write or
streamed chunked with the head leaving with the first piece. Keep-alive and pipelining (answers in order;
reading pauses while too many wait), ``Expect: 100-continue``, chunked request bodies, write back-pressure
(`Stream.write` waits while the client lags), an idle timeout for client connections, and a client that
disconnects cancels its handler (the proxy then closes the upstream connection, which makes the engine abort the
request). `Server.shutdown` answers what is in flight.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

import httptools

log = logging.getLogger("pypto_serving.gateway")

KEEPALIVE_S = 75.0  # an idle client connection (or one whose request head takes this long) is closed
MAX_HEAD_BYTES = 64 * 1024  # request line plus headers
MAX_PIPELINED = 16  # requests waiting behind the one being answered before reading pauses
LINGER_S = 2.0  # after a protocol error's answer: how long what the client still sends is read and dropped
REASONS = {s.value: s.phrase for s in HTTPStatus}


class Answer:
    """A complete answer, sent sized in one write."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))


def json_answer(document: object, status: int = 200) -> Answer:
    """A JSON answer."""
    return Answer(status, json.dumps(document).encode(), content_type="application/json")


# A handler answers at once (an Answer), later from a task (an awaitable of an Answer, or of None once it streamed
# the answer itself), or from callbacks (None at once: it finishes through `Request.respond` or `Stream.send`).
Handler = Callable[["Request"], "Answer | Awaitable[Answer | None] | None"]
Reject = Callable[["Request", int, str, str], Answer]  # (request, status, message, code) -> an error envelope


class Request:
    """One parsed request: method, path (no query), headers, the whole body; answered through its connection."""

    __slots__ = ("_callbacks", "_conn", "body", "error", "fields", "headers", "http10", "keep_alive", "method",
                 "on_cancel", "on_writable", "path", "received_at", "stream")

    def __init__(self, conn: Connection, method: str, path: str, headers: list[tuple[str, str]],
                 fields: dict[str, str], body: bytes, keep_alive: bool, http10: bool) -> None:
        self.method = method
        self.path = path
        self.headers = headers  # as received (names in lower case), in order, repeated names kept
        self.fields = fields  # lower-cased name -> first value
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.error: tuple[int, str, str] | None = None  # a protocol error to answer instead of the handler
        self._conn = conn
        self.stream: Stream | None = None
        self.received_at = time.perf_counter()  # the whole request has arrived
        self._callbacks = False  # answered from callbacks (the handler returned None at once)
        self.on_cancel: Callable[[], None] | None = None  # callbacks: the client went away before the answer ended
        self.on_writable: Callable[[], None] | None = None  # callbacks: the client takes data again after a pause

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        return self.fields.get(name)

    def start_stream(self, status: int, headers: list[tuple[str, str]]) -> Stream:
        """Begin a streamed (chunked) answer; its head leaves with the first piece."""
        self.stream = Stream(self, status, headers)
        return self.stream

    def respond(self, answer: Answer) -> None:
        """Send the answer of a request answered from callbacks."""
        self._conn.send(self, answer)

    @property
    def write_paused(self) -> bool:
        """The client lags: its connection holds more unsent data than it should (see ``on_writable``)."""
        return self._conn.write_paused

    def abort(self) -> None:
        """Cut the client's connection (a streamed answer that cannot be completed)."""
        self.keep_alive = False
        self._conn.close()


class Stream:
    """A streamed answer: `write` pieces as they come, then `end`."""

    __slots__ = ("_chunked", "_head", "_request", "ended")

    def __init__(self, request: Request, status: int, headers: list[tuple[str, str]]) -> None:
        self._request = request
        self._chunked = not request.http10  # an HTTP/1.0 client reads until the connection closes
        if not self._chunked:
            request.keep_alive = False
        framing = ("Transfer-Encoding", "chunked") if self._chunked else None
        self._head: bytes | None = request._conn.head(request, status, headers, framing)
        self.ended = False

    async def write(self, data: bytes, last: bool = False) -> None:
        """Send one piece (``last``: and end the answer in the same write); waits while the client lags.
        Raises ConnectionResetError when the client has gone."""
        conn = self._request._conn
        if conn.closed:
            raise ConnectionResetError("the client closed the connection")
        self._emit(data, last)
        if conn.write_paused:
            await conn.drain()

    def send(self, data: bytes, last: bool = False) -> None:
        """`write` for a request answered from callbacks: never waits (``Request.write_paused`` and
        ``on_writable`` tell when the client lags); a ``last`` piece finishes the request. Nothing happens once the
        client has gone."""
        request = self._request
        if request._conn.closed:
            return
        self._emit(data, last)
        if last and request._callbacks:
            request._conn.finished(request)

    def _emit(self, data: bytes, last: bool) -> None:
        out = [self._head] if self._head is not None else []
        self._head = None
        if data:
            out += [f"{len(data):x}\r\n".encode(), data, b"\r\n"] if self._chunked else [data]
        if last:
            self.ended = True
            if self._chunked:
                out.append(b"0\r\n\r\n")
        if out:
            self._request._conn.transport.write(b"".join(out))  # type: ignore[union-attr]

    async def end(self) -> None:
        """End the answer (nothing when a ``last`` piece already did)."""
        if not self.ended:
            await self.write(b"", last=True)


class Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them one at a time, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._current: Request | None = None  # the request being answered
        self._task: asyncio.Task[None] | None = None  # the task of a handler that answers from one
        self._advancing = False  # `_advance` is taking requests from the queue
        self._after_drain = False  # the next request starts once the client took what was written
        self._reading = True
        self._broken = False  # a protocol error was queued: nothing after it is parsed
        # when the head being received began (the last answer ended), or the last body piece arrived: the sweep
        # closes a connection that is not answering anything once this is keepalive_s old
        self.idle_since = self.loop.time()
        self._upgraded = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._fields: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0

    # --- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # an upgrade request is answered as plain HTTP, then the connection ends
            if self._upgraded:
                self._broken = True
            else:  # CONNECT: no request to answer
                self._fail(400, "protocol upgrades and CONNECT are not supported", "bad_request")
        except httptools.HttpParserError as exc:
            if not self._broken:
                self._fail(400, f"malformed HTTP request: {exc}", "bad_request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._task is not None:
            self._task.cancel()  # the handler stops; an upstream request it holds is closed and aborted
        elif self._current is not None and self._current.on_cancel is not None:
            cancel, self._current.on_cancel = self._current.on_cancel, None
            try:
                cancel()
            except Exception:  # a bug must not take the process with it
                log.exception("cancelling %s %s failed", self._current.method, self._current.path)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._current is not None and self._current.on_writable is not None:
            self._current.on_writable()
        if self._after_drain:
            self._after_drain = False
            self._advance()

    # --- httptools callbacks ----------------------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > MAX_HEAD_BYTES and not self._broken:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        self._headers.append((key, text))
        self._fields.setdefault(key, text)
        self._size += len(name) + len(value)
        if self._size > MAX_HEAD_BYTES and not self._broken:
            self._head_too_large()

    def on_headers_complete(self) -> None:
        self.idle_since = self.loop.time()
        self._size = 0  # from here on: body bytes
        if self._broken:
            return
        length = self._fields.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._fail(413, f"request body over {self.server.max_body_bytes} bytes", "body_too_large")
        elif (self._fields.get("expect", "").lower() == "100-continue" and self.parser.get_http_version() != "1.0"
              and self._task is None and not self._queue and self.transport is not None):
            # only when nothing is answered before it (a pipelining client then sends its body after its timeout)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._broken:
            return
        self.idle_since = self.loop.time()
        self._body.append(body)
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            self._fail(413, f"request body over {self.server.max_body_bytes} bytes", "body_too_large")

    def on_message_complete(self) -> None:
        if self._broken:
            return
        parser = self.parser
        path = httptools.parse_url(self._url).path.decode("utf-8", "surrogateescape") if self._url else "/"
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(self, parser.get_method().decode("ascii", "replace"), path, self._headers, self._fields,
                          body, parser.should_keep_alive(), parser.get_http_version() == "1.0")
        if parser.should_upgrade():
            request.keep_alive = False
            self._upgraded = True
        self._reset()
        self._enqueue(request)

    # --- answering --------------------------------------------------------------------------------------------
    def _head_too_large(self) -> None:
        self._fail(431, f"request head over {MAX_HEAD_BYTES} bytes", "request_header_fields_too_large")

    def _fail(self, status: int, message: str, code: str) -> None:
        """Queue a protocol error in order (after the requests before it) and stop parsing this connection."""
        request = Request(self, "", "", self._headers, self._fields, b"", False, False)
        request.error = (status, message, code)
        self._broken = True
        self._reset()
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self._queue.append(request)
        if self._current is None and not self._after_drain:
            self._advance()
        elif len(self._queue) >= MAX_PIPELINED and self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _advance(self) -> None:
        """Answer queued requests in order until one is still being answered (or none is left)."""
        if self._advancing:  # a request finished at once, inside `_start`: the loop below goes on
            return
        self._advancing = True
        try:
            while self._current is None and self._queue and not self.closed:
                self._start(self._queue.popleft())
                if not self._reading and len(self._queue) < MAX_PIPELINED // 2 and self.transport is not None:
                    self._reading = True
                    self.transport.resume_reading()
        finally:
            self._advancing = False

    def _start(self, request: Request) -> None:
        self._current = request
        server = self.server
        if request.error is not None:
            self.send(request, server.reject(request, *request.error))
            return
        try:
            result = server.handler(request)
        except Exception:  # a bug must not take the connection's other requests or the process with it
            result = self._handler_failed(request)
            if result is None:  # it had started a stream: cut it, as for a handler in a task
                request.abort()
                return
        if result is None:
            request._callbacks = True
        elif isinstance(result, Answer):
            self.send(request, result)
        else:
            self._task = self.loop.create_task(self._await(request, result))

    async def _await(self, request: Request, pending: Awaitable[Answer | None]) -> None:
        try:
            answer = await pending
        except asyncio.CancelledError:
            self._task = self._current = None
            self.close()  # the client went away (or the server is stopping)
            return
        except Exception:  # a bug must not take the connection's other requests or the process with it
            answer = self._handler_failed(request)
        self._task = None
        if answer is not None:
            self.send(request, answer)
        elif request.stream is None or not request.stream.ended:  # streamed by the handler, not to its end
            request.abort()
        else:
            self.finished(request)

    def _handler_failed(self, request: Request) -> Answer | None:
        """Log the handler's exception; the 500 to send, or None when its stream already started (it is cut)."""
        log.exception("handler failed on %s %s", request.method, request.path)
        if request.stream is not None:
            return None
        return self.server.reject(request, 500, "internal gateway error", "internal_error")

    def send(self, request: Request, answer: Answer) -> None:
        """Write ``answer`` (sized, in one write) and finish ``request``."""
        if not self.closed:
            body = b"" if request.method == "HEAD" else answer.body
            head = self.head(request, answer.status, answer.headers, ("Content-Length", str(len(answer.body))))
            self.transport.write(head + body if body else head)  # type: ignore[union-attr]
        self.finished(request)

    def finished(self, request: Request) -> None:
        """``request`` is answered: close or go on with the next one (once the client took what was written)."""
        self._current = None
        self.idle_since = self.loop.time()
        if self.closed:
            return
        if not request.keep_alive or self.server.closing:
            self.close(linger=request.error is not None)
        elif self.write_paused:
            self._after_drain = True
        elif self._queue:
            self._advance()

    def head(self, request: Request, status: int, headers: list[tuple[str, str]],
             framing: tuple[str, str] | None) -> bytes:
        """The status line and headers of an answer to ``request`` (Date, framing and Connection added)."""
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nDate: {self.server.date()}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if framing is not None:
            lines.append(f"{framing[0]}: {framing[1]}\r\n")
        if not request.keep_alive or self.server.closing:
            lines.append("Connection: close\r\n")
        elif request.http10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was written (or has gone)."""
        while self.write_paused and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain

    def close(self, linger: bool = False) -> None:
        """Close the connection (what was written is still sent). ``linger`` (after a protocol error, e.g. a 413
        while the client is still sending its body): end only the sending side and drop what still comes for up
        to LINGER_S, since closing with unread bytes resets the connection and the client would lose the answer."""
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()  # data_received drops it (the connection is broken); EOF closes
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    @property
    def idle(self) -> bool:
        """Nothing being answered and nothing queued."""
        return self._current is None and not self._queue



class Server:
    """The listening socket and its connections."""

    def __init__(self, handler: Handler, reject: Reject, max_body_bytes: int,
                 keepalive_s: float = KEEPALIVE_S) -> None:
        self.handler = handler
        self.reject = reject
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date = ""
        self._date_at = -1

    async def listen(self, host: str, port: int, backlog: int = 4096) -> None:
        """Start accepting connections."""
        self._server = await self.loop.create_server(lambda: Connection(self), host, port, backlog=backlog)
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections idle, stuck in a request head, or with a request body stalled for ``keepalive_s``:
        one pass per second, so no timer is set per request."""
        while True:
            await asyncio.sleep(min(1.0, self.keepalive_s))
            expired = self.loop.time() - self.keepalive_s
            for conn in list(self.connections):
                if conn.idle and conn.idle_since < expired:
                    conn.close()

    def date(self) -> str:
        """The Date header's value, formatted once per second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, formatdate(now, usegmt=True)
        return self._date

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; close idle connections; let answers in flight finish for up to ``grace_s``, then cut."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
