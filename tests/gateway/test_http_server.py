"""The gateway's client-facing HTTP/1.1 server (gateway/http_server.py) over real loopback sockets.

Each test starts a `Server` in-process with a small handler and talks to it with raw bytes, so the wire format
is checked exactly: keep-alive and HTTP/1.0 closes, pipelining order, ``Expect: 100-continue``, chunked request
bodies, the 413/431/400/500 answers made by ``reject``, chunked and unframed streamed answers, HEAD, cancelling
a handler whose client left, write back-pressure, the idle timeout and a graceful shutdown. Handlers answer in all
three ways the server takes: at once, from a task, and from callbacks (the proxy's way).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pypto_serving.gateway.http_server import Answer, Connection, Request, Server, json_answer

DEADLINE = 5.0  # seconds any single expected event may take
DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
TEXT_SSE = "text/event-stream"
EXPECT = b"Expect: 100-continue\r\n\r\n"
Handler = Callable[[Request], "Answer | Awaitable[Answer | None] | None"]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def reject(request: Request, status: int, message: str, code: str) -> Answer:
    return json_answer({"error": {"message": message, "code": code}}, status)


async def echo(request: Request) -> Answer:
    """Answers ``<method> <path> <body length> <body>``."""
    return Answer(200, b"%s %s %d %s" % (request.method.encode(), request.path.encode(), len(request.body),
                                         request.body), content_type="text/plain")


@contextlib.asynccontextmanager
async def serving(handler: Handler, max_body_bytes: int = 1024, keepalive_s: float = 75.0
                  ) -> AsyncIterator[tuple[Server, int]]:
    """A listening server on 127.0.0.1 (an ephemeral port) and that port."""
    server = Server(handler, reject, max_body_bytes, keepalive_s)
    await server.listen("127.0.0.1", 0)
    assert server._server is not None
    try:
        yield server, server._server.sockets[0].getsockname()[1]
    finally:
        await server.shutdown(0)


@dataclasses.dataclass
class Reply:
    """One parsed answer: status, headers (lower-cased names), the body as sent (``raw``) and decoded."""

    status: int
    headers: dict[str, str]
    raw: bytes = b""
    body: bytes = b""


async def read_reply(reader: asyncio.StreamReader, head_request: bool = False) -> Reply:
    """Read one answer: sized, chunked (``raw`` keeps the framing) or, without either, until EOF."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    status_line, *lines = head[:-4].decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), head
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert DATE.fullmatch(headers["date"]), headers
    if head_request:
        return Reply(int(status_line.split()[1]), headers)
    if "content-length" in headers:
        raw = body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), DEADLINE)
    elif headers.get("transfer-encoding") == "chunked":
        raw, parts = b"", []
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), DEADLINE)
            piece = await asyncio.wait_for(reader.readexactly(int(size_line, 16) + 2), DEADLINE)
            assert piece.endswith(b"\r\n")
            raw, parts = raw + size_line + piece, [*parts, piece[:-2]]
            if piece == b"\r\n":
                break
        body = b"".join(parts)
    else:
        raw = body = await asyncio.wait_for(reader.read(), DEADLINE)
    return Reply(int(status_line.split()[1]), headers, raw, body)


async def closed(reader: asyncio.StreamReader) -> None:
    """Assert the server closes the connection (EOF, nothing more sent) within the deadline."""
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""


async def request(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection with ``data`` sent on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    return reader, writer


def test_keep_alive_serves_two_requests_and_http10_closes() -> None:
    async def main() -> None:
        async with serving(echo) as (server, port):
            reader, writer = await request(port, b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
            first = await read_reply(reader)
            writer.write(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
            second = await read_reply(reader)
            assert (first.status, first.body, first.headers["content-length"]) == (200, b"GET /a 0 ", "9")
            assert (second.body, second.headers["content-type"]) == (b"POST /b 3 abc", "text/plain")
            assert "connection" not in first.headers and len(server.connections) == 1
            writer.close()

            reader, writer = await request(port, b"GET /old HTTP/1.0\r\n\r\n")
            reply = await read_reply(reader)
            assert (reply.body, reply.headers["connection"]) == (b"GET /old 0 ", "close")
            await closed(reader)

            reader, writer = await request(port, b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await read_reply(reader)).headers["connection"] == "keep-alive"
            writer.write(b"GET /k2 HTTP/1.0\r\n\r\n")
            assert (await read_reply(reader)).body == b"GET /k2 0 "
            await closed(reader)

    run(main())


def test_pipelined_requests_are_answered_in_order() -> None:
    calls: list[str] = []

    async def handler(request: Request) -> Answer:
        calls.append(request.path)
        if request.path == "/1":
            await asyncio.sleep(0.1)  # the slow first answer must still come first
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as (_, port):
            reader, _ = await request(port, b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in (1, 2, 3)))
            bodies = [(await read_reply(reader)).body for _ in range(3)]
            assert bodies == [b"GET /1 0 ", b"GET /2 0 ", b"GET /3 0 "] and calls == ["/1", "/2", "/3"]

    run(main())


def test_expect_100_continue_and_chunked_request_body() -> None:
    async def main() -> None:
        async with serving(echo) as (_, port):
            reader, writer = await request(port, b"POST /e HTTP/1.1\r\nContent-Length: 5\r\n" + EXPECT)
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body byte was sent
            writer.write(b"hello")
            assert (await read_reply(reader)).body == b"POST /e 5 hello"

            writer.write(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            assert (await read_reply(reader)).body == b"POST /c 11 hello world"

    run(main())


def test_body_over_the_limit_is_413_and_closes() -> None:
    handled: list[str] = []

    async def handler(request: Request) -> Answer:
        handled.append(request.path)
        return await echo(request)

    async def main() -> None:
        async with serving(handler, max_body_bytes=1024) as (_, port):
            reader, _ = await request(port, b"POST /big HTTP/1.1\r\nContent-Length: 1025\r\n" + EXPECT)
            reply = await read_reply(reader)  # no 100 Continue: the body is refused unread
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (413, "body_too_large")
            assert reply.headers["connection"] == "close"
            await closed(reader)

            reader, _ = await request(port, b"POST /chunks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      + b"258\r\n" + b"x" * 600 + b"\r\n" + b"258\r\n" + b"y" * 600 + b"\r\n")
            reply = await read_reply(reader)  # no terminating chunk: refused while it grows
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (413, "body_too_large")
            await closed(reader)

            size = 4 * 1024 * 1024  # sent whole: the server must not reset the connection before it is read
            reader, _ = await request(port, b"POST /all HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
            assert (await read_reply(reader)).status == 413
            await closed(reader)
            assert handled == []

    run(main())


def test_oversized_head_is_431_and_garbage_is_400() -> None:
    async def main() -> None:
        async with serving(echo) as (_, port):
            reader, _ = await request(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
            reply = await read_reply(reader)
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (431, "request_header_fields_too_large")
            assert reply.headers["connection"] == "close"
            await closed(reader)

            reader, _ = await request(port, b"\x00\x01 not http at all\r\n\r\n")
            reply = await read_reply(reader)
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (400, "bad_request")
            await closed(reader)

    run(main())


def test_streamed_answer_is_chunked_and_unframed_for_http10() -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        stream = request.start_stream(200, [("Content-Type", TEXT_SSE)])
        started.set()
        await gate.wait()
        await stream.write(b"hello")
        await stream.write(b"")  # nothing is sent, and surely no terminator
        await stream.write(b", world", last=True)
        await stream.end()  # already ended: nothing more

    async def main() -> None:
        async with serving(handler) as (_, port):
            reader, writer = await request(port, b"GET /s HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(started.wait(), DEADLINE)
            early = b""
            with contextlib.suppress(asyncio.TimeoutError):  # the head waits for the first piece
                early = await asyncio.wait_for(reader.read(1), 0.2)
            assert early == b""
            gate.set()
            reply = await read_reply(reader)
            assert reply.headers.keys() == {"date", "content-type", "transfer-encoding"}  # no length, no close
            assert (reply.headers["transfer-encoding"], reply.headers["content-type"]) == ("chunked", TEXT_SSE)
            assert reply.raw == b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
            writer.write(b"GET /again HTTP/1.1\r\n\r\n")  # the connection is kept, nothing stray was sent
            assert (await read_reply(reader)).raw.endswith(b"\r\n0\r\n\r\n")

            reader, _ = await request(port, b"GET /s HTTP/1.0\r\n\r\n")
            reply = await read_reply(reader)  # read until EOF
            assert reply.headers["connection"] == "close" and "transfer-encoding" not in reply.headers
            assert reply.raw == b"hello, world"

    run(main())


def test_client_disconnect_cancels_the_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Answer:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def main() -> None:
        async with serving(handler) as (server, port):
            _, writer = await request(port, b"GET /hang HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(started.wait(), DEADLINE)
            writer.close()
            await asyncio.wait_for(cancelled.wait(), DEADLINE)
            assert not server.connections

    run(main())


def test_handler_crash_is_500_and_the_connection_goes_on() -> None:
    async def handler(request: Request) -> Answer:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as (_, port):
            reader, writer = await request(port, b"GET /boom HTTP/1.1\r\n\r\n")
            reply = await read_reply(reader)
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (500, "internal_error")
            assert "connection" not in reply.headers
            writer.write(b"GET /fine HTTP/1.1\r\n\r\n")
            assert (await read_reply(reader)).body == b"GET /fine 0 "

    run(main())


def test_head_omits_the_body_but_keeps_its_length() -> None:
    async def main() -> None:
        async with serving(echo) as (_, port):
            reader, writer = await request(port, b"HEAD /h HTTP/1.1\r\n\r\n")
            reply = await read_reply(reader, head_request=True)
            assert (reply.status, reply.headers["content-length"]) == (200, str(len(b"HEAD /h 0 ")))
            writer.write(b"GET /next HTTP/1.1\r\n\r\n")  # a body after the HEAD answer would show up here
            assert (await read_reply(reader)).body == b"GET /next 0 "

    run(main())


def test_stream_write_waits_while_the_client_does_not_read() -> None:
    piece, count = b"z" * (256 * 1024), 64
    sent = [0]
    conns: list[Connection] = []

    async def handler(request: Request) -> None:
        conns.append(request._conn)
        stream = request.start_stream(200, [])
        for _ in range(count):
            await stream.write(piece)
            sent[0] += 1
        await stream.end()

    async def stalled() -> int:
        last = -1
        while sent[0] != last:
            last = sent[0]
            await asyncio.sleep(0.3)
        return last

    async def main() -> None:
        async with serving(handler) as (_, port):
            reader, _ = await request(port, b"GET /flood HTTP/1.1\r\n\r\n")  # and not read (yet)
            at = await asyncio.wait_for(stalled(), DEADLINE)
            assert 0 < at < count and conns[0].write_paused, (at, count)  # the handler waits in Stream.write
            reply = await read_reply(reader)
            assert reply.body == piece * count and sent[0] == count

    run(main())


def test_idle_connections_time_out() -> None:
    async def main() -> None:
        async with serving(echo, keepalive_s=0.3) as (server, port):
            reader, _ = await request(port, b"GET /once HTTP/1.1\r\n\r\n")
            assert (await read_reply(reader)).status == 200
            silent, _ = await asyncio.open_connection("127.0.0.1", port)  # never sends a request
            stalled, _ = await request(port, b"POST /body HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")  # half a body
            await closed(reader)
            await closed(silent)
            await closed(stalled)
            assert not server.connections

    run(main())


def test_shutdown_finishes_answers_in_flight_and_closes_idle_connections() -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Answer:
        if request.path == "/slow":
            started.set()
            await gate.wait()
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as (server, port):
            idle, _ = await request(port, b"GET /quick HTTP/1.1\r\n\r\n")
            assert (await read_reply(idle)).status == 200
            busy, _ = await request(port, b"GET /slow HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(started.wait(), DEADLINE)
            stopping = asyncio.create_task(server.shutdown(DEADLINE))
            await closed(idle)
            assert not stopping.done()
            gate.set()
            reply = await read_reply(busy)
            assert (reply.body, reply.headers["connection"]) == (b"GET /slow 0 ", "close")
            await closed(busy)
            await asyncio.wait_for(stopping, DEADLINE)
            with pytest.raises(ConnectionRefusedError):  # no longer listening
                await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_callback_answers_keep_pipelined_order_next_to_immediate_ones() -> None:
    def handler(request: Request) -> Answer | None:
        if request.path == "/now":
            return Answer(200, b"now")
        # answered later from a callback, as the proxy does when its replica answers
        asyncio.get_running_loop().call_later(0.05, request.respond, Answer(200, request.path.encode()))
        return None

    async def main() -> None:
        async with serving(handler) as (server, port):
            paths = (b"/later", b"/now", b"/again", b"/now")
            reader, _ = await request(port, b"".join(b"GET %s HTTP/1.1\r\n\r\n" % p for p in paths))
            bodies = [(await read_reply(reader)).body for _ in paths]
            assert bodies == [b"/later", b"now", b"/again", b"now"]
            (conn,) = server.connections
            assert conn.idle

    run(main())


def test_callback_stream_follows_the_client_and_a_departed_client_cancels_it() -> None:
    piece, count = b"z" * (256 * 1024), 64
    sent, paused, cancelled = [0], [0], asyncio.Event()

    def handler(request: Request) -> None:
        stream = request.start_stream(200, [])

        def pump() -> None:  # writes until the client lags, goes on when it takes data again
            request.on_writable = None
            while sent[0] < count:
                sent[0] += 1
                stream.send(piece, last=sent[0] == count)
                if request.write_paused and sent[0] < count:
                    paused[0] += 1
                    request.on_writable = pump
                    return

        if request.path == "/hang":
            request.on_cancel = cancelled.set
            stream.send(b"first")
            return
        pump()

    async def main() -> None:
        async with serving(handler) as (server, port):
            # the handler writes from the callback that parsed the request, until the client lags
            reader, writer = await request(port, b"GET /flood HTTP/1.1\r\n\r\n")
            reply = await read_reply(reader)
            assert reply.body == piece * count and paused[0] > 0
            writer.write(b"GET /hang HTTP/1.1\r\n\r\n")  # the connection goes on; this one never ends
            size = await asyncio.wait_for(reader.readuntil(b"first\r\n"), DEADLINE)
            assert size.endswith(b"5\r\nfirst\r\n")
            writer.close()
            await asyncio.wait_for(cancelled.wait(), DEADLINE)
            assert not server.connections

    run(main())


def test_callback_handler_crash_is_500_or_cuts_its_started_stream() -> None:
    def handler(request: Request) -> Answer | None:
        if request.path == "/midstream":
            request.start_stream(200, []).send(b"partial")
        raise RuntimeError("bug")

    async def main() -> None:
        async with serving(handler) as (_, port):
            reader, writer = await request(port, b"GET /boom HTTP/1.1\r\n\r\n")
            reply = await read_reply(reader)
            assert (reply.status, json.loads(reply.body)["error"]["code"]) == (500, "internal_error")
            writer.write(b"GET /midstream HTTP/1.1\r\n\r\n")  # the connection goes on after the 500
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b"7\r\npartial\r\n"  # cut, no terminator

    run(main())
