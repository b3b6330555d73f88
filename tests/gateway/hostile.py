"""A hostile fake engine: a small asyncio server (in a thread) that misbehaves on request.

``GET /load`` always answers a valid, idle load (so the gateway keeps it eligible). Any other request is answered
as its ``x-mode`` header says (the gateway forwards the client's headers): see ``MODES``. Every connection and
request is recorded, so a test can tell whether the gateway reused a connection and what it forwarded.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

LOAD = json.dumps({"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0}).encode()
INJECTED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n\"INJECTED!!\""


def sized(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (status.encode(), extra, len(body), body))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Seen:
    """One connection to the fake engine: the requests on it (method, path, headers) and when it closed."""

    number: int
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    closed_at: float | None = None


class HostileEngine:
    """Start with `start()`; ``url``; ``connections`` records what the gateway sent."""

    def __init__(self) -> None:
        self.connections: list[Seen] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileEngine:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def requests(self, path: str = "/v1/completions") -> list[tuple[Seen, dict[str, str]]]:
        """(connection, headers) of every request to ``path`` so far."""
        return [(c, h) for c in list(self.connections) for _, p, h in list(c.requests) if p == path]

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = Seen(len(self.connections))
        self.connections.append(seen)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers: dict[str, str] = {}
                for text in lines:
                    name, _, value = text.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                seen.requests.append((method, path, headers))
                if path == "/load":
                    writer.write(sized(LOAD))
                    continue
                if not await MODES[headers.get("x-mode", "ok")](reader, writer, headers):
                    return
        finally:
            seen.closed_at = time.monotonic()
            writer.transport.abort()


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    writer.write(sized(json.dumps({"choices": [{"text": "fine"}], "headers": headers}).encode(),
                       extra=b"Connection: keep-alive, x-secret-hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"))
    return True


async def extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """A complete answer with a second, unasked-for answer in the same write (H2)."""
    writer.write(sized(b'"first"') + INJECTED)
    return True


async def late_extra(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """A complete answer, then an unasked-for answer while the connection idles in the pool (H2)."""
    writer.write(sized(b'"first"'))
    await asyncio.sleep(0.2)
    writer.write(INJECTED)
    return True


async def no_content_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """A 204 that carries a body anyway: an answer for the next request on the connection (H2)."""
    writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%s" % (len(INJECTED), INJECTED))
    return True


async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """103 Early Hints, then the final answer (L2)."""
    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(sized(b'"final"'))
    return True


async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """One 1 MiB header (L4)."""
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok")
    return True


async def many_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """5,000 headers (L4)."""
    writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 5000 + b"Content-Length: 2\r\n\r\nok")
    return True


async def huge_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """Announces a 400 MiB body (L4)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 419430400\r\n\r\n")
    writer.write(b"x" * 65536)
    await asyncio.sleep(30)
    return False


async def endless_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """An SSE stream that never ends and sends as fast as it may (L4 when unbounded, M2 when nobody reads)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    event = chunk(b"data: " + b"x" * 4000 + b"\n\n")
    while not writer.transport.is_closing():
        writer.write(event * 16)
        await writer.drain()
    return False


async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """Three SSE events 0.2 s apart, then the end."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(3):
        writer.write(chunk(b"data: %d\n\n" % i))
        await writer.drain()
        await asyncio.sleep(0.2)
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    return True


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> bool:
    """A streamed head and one event, then silence."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + chunk(b"data: 0\n\n"))
    await asyncio.sleep(3600)
    return False


MODES = {"ok": ok, "extra": extra, "late-extra": late_extra, "204-body": no_content_body, "103": early_hints,
         "huge-header": huge_header, "many-headers": many_headers, "huge-length": huge_length,
         "endless": endless_stream, "slow-stream": slow_stream, "hang": hang}
