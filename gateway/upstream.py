"""The gateway's HTTP/1.1 client towards the engines: pooled keep-alive connections, responses parsed by httptools.

The proxy's hot path pays for every layer between two sockets, so this client does only what a reverse proxy
needs: one write per request (head and body together), responses handed over as they arrive (every chunk that
is buffered when the reader asks comes out as one piece), an idle timeout between chunks, back-pressure (reading
pauses while the reader lags), and connections reused only after a complete keep-alive response. A response
that is abandoned half-read closes its connection, which is how an engine learns that its client went away.
The idle timeout costs no timer per request: a waiting response notes when its replica last sent something, and
one sweep per pool (every SWEEP_S while anything waits) fails those silent for longer than their timeout.

Errors: `ConnectFailed` (no connection or a connect timeout: nothing reached the replica), `ReadTimeout` (the
replica went silent for ``idle_timeout_s``), `UpstreamClosed` (the connection closed or sent garbage).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

KEEPALIVE_S = 4.0  # an idle pooled connection is not reused after this long (engines close theirs after 5 s)
HIGH_WATER = 256 * 1024  # buffered response bytes above which reading from the replica pauses
SWEEP_S = 0.05  # how often waiting responses are checked for their idle timeout (its precision)


class UpstreamError(Exception):
    """A request to a replica failed."""


class ConnectFailed(UpstreamError):
    """The connection could not be made (refused, unreachable, connect timeout): the replica saw nothing."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ReadTimeout(UpstreamError):
    """The replica sent nothing for the idle timeout."""


class UpstreamClosed(UpstreamError):
    """The connection closed before the response was complete, or the response was not valid HTTP."""


def header_fields(headers: list[tuple[str, str]], body: bytes | None) -> str:
    """The header lines of a request (Content-Length added for a body), for `request_head`."""
    lines = [f"{k}: {v}\r\n" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    return "".join(lines)


def request_head(method: str, path: str, host: str, fields: str) -> bytes:
    """The request line and headers of a request to ``host``."""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n".encode("utf-8", "surrogateescape")


class Origin:
    """Where one replica listens: what the pool keys connections by, and the Host header."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.host_header = parts.netloc.rpartition("@")[2]


class Response:
    """One response being received: status and headers first, then the body as it arrives.

    Read it either by awaiting (`next_chunk`, `read`) or through a ``listener``: called (with the response) after
    each read from the replica that changed something (head, body, end, error) and on a timeout or a closed
    connection; it takes the body with `take` and controls back-pressure with `pause` and `resume`.
    """

    __slots__ = ("_buffered", "_chunks", "_complete", "_connection", "_dirty", "_error", "_feeding", "_head_done",
                 "_idle_timeout_s", "_received", "_waiter", "active_at", "content_length", "content_type",
                 "first_body_at", "headers", "listener", "on_head", "reused", "status")

    def __init__(self, connection: Connection, idle_timeout_s: float,
                 listener: Callable[[Response], None] | None = None) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # names in lower case
        self.content_length: str | None = None  # the Content-Length header, when sent
        self.content_type = ""  # the Content-Type header ("" when none)
        self._connection = connection
        self._idle_timeout_s = idle_timeout_s
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._received = False  # any byte of the response arrived
        self._head_done = False
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.active_at = 0.0  # loop time of the replica's last bytes (or of the wait's start), for the idle sweep
        self.first_body_at = 0.0  # perf_counter() when the first body bytes arrived
        self.on_head: Callable[[], None] | None = None  # called (from the protocol) when the head arrives
        self.listener = listener
        self.reused = False  # sent on a kept-alive connection (one the replica may have closed as it was sent)
        self._feeding = False  # the connection is parsing a read: the listener is called once it is done
        self._dirty = False  # something changed while feeding

    @property
    def complete(self) -> bool:
        """The whole body has arrived (whatever is not read yet is buffered)."""
        return self._complete and self._error is None

    @property
    def head_done(self) -> bool:
        """Status and headers have arrived."""
        return self._head_done

    @property
    def received(self) -> bool:
        """Any byte of the response arrived."""
        return self._received

    @property
    def error(self) -> UpstreamError | None:
        """Why the response failed (None while it has not)."""
        return self._error

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def next_chunk(self) -> bytes | None:
        """Everything received and not read yet (waiting for something), or None at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            await self._wait()
        data = self.take()
        self._connection.resume()
        return data

    def take(self) -> bytes:
        """Everything received and not taken yet (b"" when nothing is), without waiting."""
        if not self._chunks:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def pause(self) -> None:
        """Stop reading from the replica (the reader lags); the idle timeout does not run meanwhile."""
        self._connection.pause()

    def resume(self) -> None:
        """Read from the replica again."""
        self.active_at = self._connection.loop.time()
        self._connection.resume()

    def release(self) -> None:
        """Done with the response: a complete keep-alive exchange returns its connection to the pool, any other
        closes it (the replica then aborts whatever it still runs for this request)."""
        if self.listener is not None:
            self._connection.pool.waiting.discard(self)
        self._connection.finish(self.complete)

    async def _wait(self) -> None:
        connection = self._connection
        waiter = self._waiter = connection.loop.create_future()
        self.active_at = connection.loop.time()
        connection.pool.watch(self)
        try:
            await waiter
        finally:
            connection.pool.waiting.discard(self)
            self._waiter = None

    def expire_if_idle(self, now: float) -> None:
        """Fail the wait with ReadTimeout when the replica has been silent for the idle timeout (the sweep); a
        response whose reader paused the replica is not waiting for it."""
        if (now - self.active_at >= self._idle_timeout_s and self._error is None and not self._complete
                and not self._connection._paused):
            self._error = ReadTimeout(f"no response bytes for {self._idle_timeout_s:g}s")
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
        elif self.listener is not None:
            if self._feeding:
                self._dirty = True
            else:
                self.listener(self)

    def _fed(self) -> None:
        """The connection finished parsing a read: tell the listener what changed."""
        self._feeding = False
        if self._dirty:
            self._dirty = False
            self.listener(self)  # type: ignore[misc]  # only set with a listener

    # --- fed by the connection --------------------------------------------------------------------------------
    def _head(self, status: int) -> None:
        self.status = status
        self._head_done = True
        if self.on_head is not None:
            self.on_head()
        self._wake()

    def _body(self, data: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = time.perf_counter()
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self.listener is None:  # a listener takes everything after each read
            self._connection.pause()
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()

    async def _wait_head(self) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()


class Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, key: str, origin: Origin) -> None:
        self.pool = pool
        self.key = key  # the replica's base URL
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # once per connection (each lookup costs a getpid() syscall)
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.open = False
        self.idle_since = 0.0
        self._paused = False
        self._until_eof = False  # a response body delimited by the connection closing
        self._framed = False  # the response being parsed has a Transfer-Encoding header

    # --- asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is out of step, drop it
            self.close()
            return
        response = self.response
        response._received = True
        response.active_at = self.loop.time()
        response._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("the replica switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"invalid HTTP response from the replica: {exc}"))
        response._fed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.response is None:  # idle in the pool (the replica's keep-alive ended, or it went away)
            self.pool.discard(self)
        else:
            if self._until_eof and self.response._head_done:
                self.response._end()
            else:
                self.response._fail(UpstreamClosed(f"the replica closed the connection{f': {exc}' if exc else ''}"))

    # --- httptools callbacks ----------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("utf-8", "replace")
        response = self.response
        response.headers.append((key, text))  # type: ignore[union-attr]
        if key == "content-length":
            response.content_length = text  # type: ignore[union-attr]
        elif key == "content-type":
            response.content_type = text  # type: ignore[union-attr]
        elif key == "transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        response = self.response
        self._until_eof = response.content_length is None and not self._framed  # type: ignore[union-attr]
        self._framed = False
        response._head(self.parser.get_status_code())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.response._body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self._until_eof = False
        if not self.parser.should_keep_alive():
            self.open = False  # finish() closes it
        self.response._end()  # type: ignore[union-attr]

    # --- used by Response and the pool ------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes | None, response: Response) -> None:
        self.response = response
        self.transport.write(head + body if body else head)  # type: ignore[union-attr]

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and self.open:
            self._paused = False
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        self.response = None
        if reusable and self.open and not self._paused:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.close()


class UpstreamPool:
    """Keep-alive connections to every replica, reused most-recent first."""

    def __init__(self, connect_timeout_s: float, idle_timeout_s: float, keepalive_s: float = KEEPALIVE_S) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[str, list[Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.waiting: set[Response] = set()  # responses waiting for their replica (the idle sweep checks them)
        self.sweeper: asyncio.Task[None] | None = None

    def watch(self, response: Response) -> None:
        """Check ``response`` for its idle timeout while it waits (the caller discards it from ``waiting`` after);
        starts the sweep, which ends by itself once nothing waits."""
        self.waiting.add(response)
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                await asyncio.sleep(SWEEP_S)
                now = loop.time()
                for response in list(self.waiting):
                    response.expire_if_idle(now)
        finally:
            self.sweeper = None

    async def request(self, method: str, base_url: str, path: str, headers: list[tuple[str, str]],
                      body: bytes | None = None, timeout_s: float | None = None) -> Response:
        """Send a request to the replica at ``base_url``; returns once the response's head arrived. The caller
        reads the body and must `Response.release()` it. ``timeout_s`` overrides the idle timeout."""
        fields = header_fields(headers, body)
        while True:
            connection = self.take(base_url)
            reused = connection is not None
            if connection is None:
                connection = await self.connect(base_url)
            response = Response(connection, self.idle_timeout_s if timeout_s is None else timeout_s)
            connection.send(request_head(method, path, connection.origin.host_header, fields), body, response)
            try:
                await response._wait_head()
            except UpstreamClosed:
                response.release()
                # A kept-alive connection that the replica closed as we sent (its idle timeout): the request
                # never reached it, so it goes again on a fresh connection.
                if reused and not response._received:
                    continue
                raise
            except BaseException:
                response.release()
                raise
            return response

    def start(self, connection: Connection, method: str, path: str, fields: str, body: bytes | None,
              listener: Callable[[Response], None], on_head: Callable[[], None] | None = None) -> Response:
        """Send a request on ``connection`` (from `take` or `connect`; ``fields`` from `header_fields`) and return
        its response at once: ``listener`` hears of it (see `Response`), which must `Response.release()` it."""
        response = Response(connection, self.idle_timeout_s, listener)
        response.on_head = on_head
        response.reused = connection.idle_since > 0
        response.active_at = connection.loop.time()
        self.watch(response)  # until released
        connection.send(request_head(method, path, connection.origin.host_header, fields), body, response)
        return response

    async def get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET: (status, body); ``timeout_s`` bounds each wait for the replica after connecting."""
        response = await self.request("GET", base_url, path, [], timeout_s=timeout_s)
        try:
            return response.status, await response.read()
        finally:
            response.release()

    def put(self, connection: Connection) -> None:
        """Return a connection after a complete exchange."""
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, []).append(connection)

    def discard(self, connection: Connection) -> None:
        """Forget an idle connection that closed."""
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def close(self) -> None:
        """Close every idle connection (and stop the idle sweep)."""
        if self.sweeper is not None:
            self.sweeper.cancel()
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def take(self, base_url: str) -> Connection | None:
        """A kept-alive connection to ``base_url`` (most recently used first), or None when there is none."""
        idle = self._idle.get(base_url)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.open and now - connection.idle_since < self.keepalive_s:
                return connection
            connection.close()
        return None

    async def connect(self, base_url: str) -> Connection:
        """A new connection to ``base_url``; raises ConnectFailed."""
        origin = Origin(base_url)
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            tls = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(loop.create_connection(
                lambda: Connection(self, base_url, origin), origin.host, origin.port, ssl=tls), self.connect_timeout_s)
        except asyncio.TimeoutError as exc:
            raise ConnectFailed(f"connect timeout after {self.connect_timeout_s:g}s", timed_out=True) from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc}") from exc
        return connection
