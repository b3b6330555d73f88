"""The gateway's HTTP client towards the engines: aiohttp's pooled keep-alive client, distrustful of what it reads.

aiohttp parses responses in C (llhttp), bounds the status line, each header line and the header count, skips
1xx interim answers (103 Early Hints, a stray 100 Continue), and keeps no cookie jar here. On top of it:

* a connection is reused only after a regular exchange: HTTP/1.1, a body framed by Content-Length or chunked
  encoding and read to its end, no body on a 204 or 304, no ``Connection: close``, no error, no bytes after the
  answer. Anything else closes it (`Response.release`). A pooled connection that received bytes while idle (an
  answer nobody asked for) or failed is closed when taken (`SafeConnector`), so those bytes can never be read as
  the answer to another client's request;
* response bodies are bounded (`UpstreamTooLarge`, from Content-Length before a byte is read, or as they arrive);
* errors are the gateway's own: `ConnectFailed` (nothing reached the replica), `ReadTimeout` (the replica went
  silent for the idle timeout), `UpstreamClosed` (it closed early), `UpstreamInvalid` (it sent something that is not
  HTTP, or over the limits: `UpstreamTooLarge`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

KEEPALIVE_S = 4.0  # an idle pooled connection is not reused after this long (engines close theirs after 5 s)
MAX_HEAD_FIELD = 8190  # bytes of the status line and of each header line
MAX_HEADERS = 100
SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")  # send only what the client sent


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


class UpstreamInvalid(UpstreamError):
    """The replica answered, but not with valid HTTP: it did take the request, so it is not sent again."""


class UpstreamTooLarge(UpstreamInvalid):
    """The response head or body is over the gateway's limits."""


def check_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host, else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


class SafeConnector(aiohttp.TCPConnector):
    """aiohttp's connector, except that a pooled connection that got bytes (or an error) while idle is closed
    instead of reused."""

    async def _get(self, key: Any, traces: list[Any]) -> Any:
        while True:
            connection = await super()._get(key, traces)
            if connection is None or not connection.protocol.should_close:
                return connection
            connection.close()


def _error(exc: BaseException) -> UpstreamError:
    """aiohttp's (or asyncio's) exception as one of the gateway's."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(f"connect timeout: {exc}", timed_out=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(f"cannot connect: {exc}")
    if isinstance(exc, asyncio.TimeoutError):
        return ReadTimeout("no response bytes for the idle timeout")
    if isinstance(exc, aiohttp.ClientResponseError):
        message = str(exc.message)
        if "Got more than" in message or "Too many headers" in message:
            return UpstreamTooLarge(f"response head over the limits: {message}")
        return UpstreamInvalid(f"invalid HTTP response from the replica: {message}")
    return UpstreamClosed(f"the replica closed the connection or broke the protocol: {exc!r}")


class Response:
    """One response of a replica: status and headers, then the body as it arrives (`next_chunk`, `read`).
    `release` once done: the connection goes back to the pool only after a regular, complete exchange."""

    __slots__ = ("_limit", "_raw", "_received", "content_length", "content_type", "headers", "status")

    def __init__(self, raw: aiohttp.ClientResponse, max_body_bytes: int) -> None:
        self._raw = raw
        self._limit = max_body_bytes
        self._received = 0
        self.status = raw.status
        self.headers = [(k.decode("latin-1").lower(), v.decode("utf-8", "surrogateescape"))
                        for k, v in raw.raw_headers]
        self.content_length = raw.content_length
        self.content_type = raw.headers.get("Content-Type", "")
        if self.content_length is not None and self.content_length > max_body_bytes:
            self.release()
            raise UpstreamTooLarge(f"response body of {self.content_length} bytes is over {max_body_bytes}")

    @property
    def complete(self) -> bool:
        """The whole body has been read."""
        return self._raw.content.at_eof()

    async def next_chunk(self) -> bytes:
        """What has arrived and was not read yet (waiting for something), b"" at the end of the body."""
        try:
            chunk = await self._raw.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _error(exc) from exc
        self._received += len(chunk)
        if self._received > self._limit:
            raise UpstreamTooLarge(f"response body over {self._limit} bytes")
        return chunk

    async def next_line(self, max_bytes: int) -> bytes:
        """The next line of an endless body (server-sent events), b"" at its end. Lines are bounded by
        ``max_bytes`` (`UpstreamTooLarge`), the body as a whole is not."""
        try:
            return await self._raw.content.readuntil(b"\n", max_size=max_bytes)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _error(exc) from exc
        except aiohttp.http_exceptions.LineTooLong as exc:
            raise UpstreamTooLarge(f"a line over {max_bytes} bytes: {exc}") from exc

    async def read(self) -> bytes:
        """The whole body."""
        body = bytearray()
        while chunk := await self.next_chunk():
            body += chunk
        return bytes(body)

    @property
    def regular(self) -> bool:
        """The exchange may leave its connection reusable (aiohttp's own checks come on top)."""
        raw = self._raw
        if raw.version != aiohttp.HttpVersion11 or not raw.content.at_eof() or raw.content.exception() is not None:
            return False
        framed = raw.headers.getall("Transfer-Encoding", None)
        lengths = raw.headers.getall("Content-Length", None)
        if raw.status in (204, 304) or raw.status < 200:
            return framed is None and lengths in (None, ["0"])
        connection = ",".join(raw.headers.getall("Connection", ())).lower()
        return (framed is not None or lengths is not None) and "close" not in connection

    def release(self) -> None:
        """Done with the response: a regular, complete exchange returns its connection to the pool, anything else
        closes it (the replica then aborts whatever it still runs for this request)."""
        if self.regular:
            self._raw.release()
        else:
            self._raw.close()


class Client:
    """Keep-alive connections to every replica, with the gateway's timeouts and limits."""

    def __init__(self, connect_timeout_s: float, idle_timeout_s: float, max_body_bytes: int,
                 max_head_field: int = MAX_HEAD_FIELD, max_headers: int = MAX_HEADERS) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self._limits = {"max_line_size": max_head_field, "max_field_size": max_head_field,
                        "max_headers": max_headers}
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}  # parsed once: replica URL + path

    def _new_session(self, force_close: bool) -> aiohttp.ClientSession:
        pooling: dict[str, Any] = {"force_close": True} if force_close else {"keepalive_timeout": KEEPALIVE_S}
        connector = SafeConnector(limit=0, **pooling)
        return aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=SKIP_AUTO, raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                          sock_read=self.idle_timeout_s), **self._limits)

    async def send(self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes | None = None,
                   fresh: bool = False, timeout_s: float | None = None) -> Response:
        """Send a request; returns once the response's head arrived (the caller reads the body and must
        `Response.release` it). ``fresh``: on a new connection, closed afterwards. ``timeout_s`` overrides the idle
        timeout."""
        if fresh:
            session = self._fresh = self._fresh or self._new_session(force_close=True)
        else:
            session = self._session = self._session or self._new_session(force_close=False)
        options: dict[str, Any] = {}
        if timeout_s is not None:
            options["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                                       sock_read=timeout_s)
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > 4096:  # replicas come and go
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        try:
            raw = await session.request(method, parsed, headers=CIMultiDict(headers), data=body,
                                         allow_redirects=False, compress=None, **options)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _error(exc) from exc
        return Response(raw, self.max_body_bytes)

    async def get(self, url: str, timeout_s: float, max_bytes: int = 1024 * 1024) -> tuple[int, bytes]:
        """A small GET: (status, body); ``timeout_s`` bounds each wait for the replica after connecting."""
        response = await self.send("GET", url, (), timeout_s=timeout_s)
        try:
            body = bytearray()
            while chunk := await response.next_chunk():
                body += chunk
                if len(body) > max_bytes:
                    raise UpstreamTooLarge(f"answer over {max_bytes} bytes")
            return response.status, bytes(body)
        finally:
            response.release()

    async def close(self) -> None:
        """Close every connection."""
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None
