"""A recording TCP relay: put it between the gateway and an engine to see the exact bytes the engine sent.

Real sockets both ways (it changes nothing on the wire); used to prove that the gateway relays a streamed body
byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import h11

from tests.support.common import free_port


class Tap:
    """Relay 127.0.0.1:<port> -> ``target``; ``responses`` collects the raw bytes each upstream connection sent."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.responses: list[bytearray] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Tap:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        record = bytearray()
        self.responses.append(record)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray | None) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if log is not None:
                        log.extend(data)
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, None), pump(up_reader, writer, record))


def http_bodies(raw: bytes) -> list[tuple[int, bytes]]:
    """Parse the HTTP/1.1 responses in ``raw`` (one connection's server side): [(status, de-chunked body)]."""
    conn = h11.Connection(h11.CLIENT)
    # h11 needs the requests it answers: feed as many dummy GETs as it asks for.
    out: list[tuple[int, bytes]] = []
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(bytes(raw))
    status, body = 0, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(event, h11.Response):
            status, body = event.status_code, bytearray()
        elif isinstance(event, h11.Data):
            body.extend(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, bytes(body)))
            if conn.their_state is h11.DONE and conn.our_state is h11.DONE:
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
                conn.send(h11.EndOfMessage())
        elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            break
    return out
