"""The gateway's upstream client (gateway/upstream.py) against scripted HTTP servers on loopback sockets.

Each test starts an asyncio server whose handler writes exactly the bytes under test (chunked, sized,
close-delimited, silent, garbage, closing mid-body), so framing, keep-alive reuse, timeouts, back-pressure and
the closing of abandoned responses are checked on real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pypto_serving.gateway.upstream import (
    HIGH_WATER,
    ConnectFailed,
    Origin,
    ReadTimeout,
    Response,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    header_fields,
)
from tests.support.common import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request (body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    """A loopback server running ``handler`` per connection; counts connections and keeps the requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Server:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


async def wait_until(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds (polling), failing after ``deadline_s``."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), deadline_s)


def test_origin_parses_http_and_https_urls() -> None:
    assert (Origin("http://10.0.0.1:8000").port, Origin("https://engine").port) == (8000, 443)
    assert Origin("http://[::1]:8000").host_header == "[::1]:8000" and Origin("http://[::1]:8000").host == "::1"
    for bad in ("engine:8000", "ftp://x", "http://"):
        with pytest.raises(ValueError, match="not an http"):
            Origin(bad)


def test_chunked_stream_relays_pieces_and_reuses_the_connection() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head + body)
            writer.write(OK_HEAD + chunk(b"data: 1\n\n"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            for _ in range(2):
                response = await pool.request("POST", server.url, "/v1/completions",
                                              [("Content-Type", "application/json"), ("x-request-id", "r1")], b"{}")
                assert response.status == 200 and response.header("CONTENT-TYPE") == "text/event-stream"
                pieces = []
                while (piece := await response.next_chunk()) is not None:
                    pieces.append(piece)
                    assert response.complete == (pieces[-1].endswith(b"[DONE]\n\n"))
                response.release()
                assert pieces == [b"data: 1\n\n", b"data: 2\n\ndata: [DONE]\n\n"]  # buffered pieces come as one
            assert server.connections == 1  # the second request reused the keep-alive connection
            pool.close()
        head = seen[0].decode()
        assert head.startswith("POST /v1/completions HTTP/1.1\r\n") and f"Host: 127.0.0.1:{server.port}" in head
        assert "x-request-id: r1" in head and "Content-Length: 2" in head and seen[0].endswith(b"\r\n\r\n{}")

    run(main())


def test_sized_and_close_delimited_bodies() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/sized" in head:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!")
        else:  # HTTP/1.0 style: the body ends when the connection closes
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            assert await pool.get(server.url, "/sized", 5) == (404, b"nope!")
            assert await pool.get(server.url, "/eof", 5) == (200, b"until the end")
            pool.close()

    run(main())


def test_refused_connection_is_connect_failed() -> None:
    async def main() -> None:
        with pytest.raises(ConnectFailed) as failed:
            await UpstreamPool(5, 5).request("GET", f"http://127.0.0.1:{free_port()}", "/load", [])
        assert not failed.value.timed_out

    run(main())


async def silent_replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers nothing, or (for a path with ``/after-head``) the head and one piece; then silence until the client
    closes."""
    head, _ = await read_request(reader)
    if b"/after-head" in head:
        writer.write(OK_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
    await reader.read()


def test_silent_replica_is_a_read_timeout_before_and_after_the_head() -> None:
    async def main() -> None:
        async with Server(silent_replica) as server:
            pool = UpstreamPool(5, 0.2)
            with pytest.raises(ReadTimeout):
                await pool.request("GET", server.url, "/before-head", [])
            response = await pool.request("GET", server.url, "/after-head", [])
            assert await response.next_chunk() == b"data: 1\n\n"
            with pytest.raises(ReadTimeout):
                await response.next_chunk()
            response.release()

    run(main())


def test_listener_hears_each_read_once_and_the_head_at_once() -> None:
    body_allowed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(OK_HEAD)  # the head alone, as an engine does when it accepts a streamed request
            await writer.drain()
            await body_allowed.wait()
            # two pieces and the end in one write: the listener hears of them together
            writer.write(chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n") + b"0\r\n\r\n")
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            heads: list[int] = []
            for round_no in range(2):
                calls: list[tuple[bool, bytes, bool]] = []
                done = asyncio.Event()

                def listener(response: Response, calls: list = calls, done: asyncio.Event = done) -> None:
                    calls.append((response.head_done, response.take(), response.complete))
                    if response.complete:
                        response.release()
                        done.set()

                connection = pool.take(server.url) or await pool.connect(server.url)
                response = pool.start(connection, "POST", "/v1/completions", header_fields([], b"{}"), b"{}",
                                      listener, on_head=lambda: heads.append(1))
                await wait_until(lambda calls=calls: bool(calls))  # the head is heard on its own
                assert calls == [(True, b"", False)] and response.status == 200 and len(heads) == round_no + 1
                body_allowed.set()
                await asyncio.wait_for(done.wait(), 5)
                body_allowed.clear()
                assert calls[1:] == [(True, b"data: 1\n\ndata: 2\n\n", True)]
            assert server.connections == 1 and heads == [1, 1]  # the second request reused the connection
            pool.close()

    run(main())


def test_listener_hears_a_silent_replica_time_out_unless_it_paused_it() -> None:
    async def main() -> None:
        async with Server(silent_replica) as server:
            pool = UpstreamPool(5, 0.2)
            errors: list[UpstreamError] = []
            first = asyncio.Event()

            def listener(response: Response) -> None:
                if response.error is not None:
                    errors.append(response.error)
                    response.release()
                elif response.take():
                    response.pause()  # as the proxy does while its client lags
                    first.set()

            response = pool.start(await pool.connect(server.url), "GET", "/after-head", "", None, listener)
            await asyncio.wait_for(first.wait(), 5)
            await asyncio.sleep(0.6)  # three idle timeouts: none fires while the reader holds the replica
            assert not errors
            response.resume()
            await wait_until(lambda: bool(errors))
            assert isinstance(errors[0], ReadTimeout) and len(errors) == 1

    run(main())


def test_abandoned_response_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await reader.read()  # EOF: the client dropped the stream
        closed.set()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            response = await pool.request("POST", server.url, "/v1/completions", [], b"{}")
            await response.next_chunk()
            response.release()  # not complete: the connection closes, which aborts the request upstream
            await asyncio.wait_for(closed.wait(), 5)
            response = await pool.request("POST", server.url, "/v1/completions", [], b"{}")
            response.release()
            assert server.connections == 2  # the abandoned connection was not pooled

    run(main())


@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short",
                                   OK_HEAD + chunk(b"data: 1\n\n"), b"SMTP ready\r\n\r\n"])
def test_closed_mid_response_or_garbage_is_upstream_closed(reply: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            with pytest.raises(UpstreamClosed):
                response = await pool.request("GET", server.url, "/", [])
                try:
                    await response.read()
                finally:
                    response.release()

    run(main())


def test_slow_reader_pauses_the_replica_and_gets_every_byte() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 16384):
            writer.write(body[start:start + 16384])
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            response = await pool.request("GET", server.url, "/big", [])
            await asyncio.sleep(0.3)  # the reader lags: buffering stops near the high-water mark
            # (one socket read may overshoot the mark: uvloop reads up to 256 KiB at a time)
            assert response._connection._paused and response._buffered <= 2 * HIGH_WATER < len(body)
            assert await response.read() == body
            response.release()
            pool.close()

    run(main())


def test_connection_closed_by_the_replica_while_idle_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()  # then the handler returns: the server closes the kept-alive connection

    async def main() -> None:
        async with Server(handler) as server:
            pool = UpstreamPool(5, 5)
            assert await pool.get(server.url, "/", 5) == (200, b"ok")
            await asyncio.sleep(0.1)  # the close reaches the pooled connection
            assert pool._idle == {}  # ... which left the pool (no dead connections pile up as replicas come and go)
            assert await pool.get(server.url, "/", 5) == (200, b"ok")
            assert server.connections == 2

    run(main())
