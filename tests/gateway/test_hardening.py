"""Regression tests for the security findings of issue 20 (H1, H2, M2, M3, L1-L7), each reproduced with raw
sockets against a real gateway process, in front of a hostile fake engine (tests/gateway/hostile.py)."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.gateway.harness import GatewayProcess, start_gateway
from tests.gateway.hostile import HostileEngine
from tests.support.common import wait_for

KEY = "hardening-key"
AUTH = f"Authorization: Bearer {KEY}\r\n"
DEADLINE = 10.0
BODY = b'{"prompt": "hi", "max_tokens": 1}'


@pytest.fixture(scope="module")
def engine() -> Iterator[HostileEngine]:
    engine = HostileEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "key"
    path.write_text(KEY)
    return path


@pytest.fixture(scope="module")
def gateway(engine: HostileEngine, key_file: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway("--endpoints", engine.url, "--api-key-file", str(key_file), "--max-body-bytes", "1048576",
                       "--max-upstream-body-bytes", "262144", "--keepalive-timeout", "2", "--body-timeout", "1",
                       "--body-min-rate", "1000", "--send-timeout", "1", "--breaker-failures", "1000")
    yield gw
    gw.stop()


def connect(gw: GatewayProcess) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
    return sock


def read_answer(sock: socket.socket, buffered: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One answer from ``sock``: status, headers (lower-case names; the last of repeated ones), body (sized or
    de-chunked). ``buffered``: bytes already read from the socket (what follows this answer is left there)."""
    data = buffered if buffered is not None else bytearray()

    def need(n: int) -> None:
        while len(data) < n:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"closed after {bytes(data[:200])!r}")
            data.extend(more)

    while b"\r\n\r\n" not in data:
        need(len(data) + 1)
    end = data.index(b"\r\n\r\n")
    line, *lines = data[:end].decode("latin-1").split("\r\n")
    del data[:end + 4]
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    status = int(line.split()[1])
    if "content-length" in headers:
        size = int(headers["content-length"])
        need(size)
        body = bytes(data[:size])
        del data[:size]
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in data:
                need(len(data) + 1)
            size = int(data[:data.index(b"\r\n")], 16)
            del data[:data.index(b"\r\n") + 2]
            need(size + 2)
            body += bytes(data[:size])
            del data[:size + 2]
            if size == 0:
                break
    else:
        body = b""
    return status, headers, body


def post(gw: GatewayProcess, mode: str = "ok", extra: str = "") -> tuple[int, dict[str, str], bytes]:
    """A completion through the gateway on a new connection, the fake engine told to answer as ``mode``."""
    with connect(gw) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}x-mode: {mode}\r\n{extra}"
                     f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        return read_answer(sock)


def envelope(body: bytes, code: str | None = None) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (EOF or reset) within the deadline."""
    sock.settimeout(DEADLINE)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def rss(gw: GatewayProcess) -> int:
    return psutil.Process(gw.proc.pid).memory_info().rss


# --- the client side -------------------------------------------------------------------------------------------
def test_h1_header_count_and_size_are_bounded(gateway: GatewayProcess) -> None:
    for head in (b"X-E:\r\n" * 65000, b"X-Big: " + b"a" * 70000 + b"\r\n"):
        with connect(gateway) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n" + head + b"\r\n")
            status, _, body = read_answer(sock)
            assert status == 431
            envelope(body, "request_header_fields_too_large")


def test_h1_a_body_of_tiny_chunks_costs_its_size_not_an_object_per_chunk(gateway: GatewayProcess) -> None:
    """4 connections each hold 512 KiB of 1-byte chunks (3 MiB on the wire) unfinished: the gateway's memory grows
    by about the bodies' size, not 8x (the hand-written server kept an object per chunk)."""
    before = rss(gateway)
    socks = []
    try:
        for _ in range(4):
            sock = connect(gateway)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n" + AUTH.encode()
                         + b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * (512 * 1024))
            socks.append(sock)
        time.sleep(0.5)  # the last bytes are parsed (the body deadline is 1 s + 1 s per 1,000 bytes)
        grown = rss(gateway) - before
        assert grown < 24 * 1024 * 1024, f"{grown / 2**20:.1f} MiB for 2 MiB of bodies"
    finally:
        for sock in socks:
            sock.close()


def test_m3_a_trickled_body_times_out_and_a_slow_head_is_closed(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}Content-Length: 100\r\n\r\n{{".encode())
        started = time.monotonic()
        sock.settimeout(0.3)
        answer = bytearray()
        while b"\r\n\r\n" not in answer and time.monotonic() - started < DEADLINE:
            try:
                sock.send(b" ")  # one byte every 0.3 s: far below 1,000 bytes/s
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(DEADLINE)
        status, _, body = read_answer(sock, answer)
        assert status == 408 and time.monotonic() - started < 4
        envelope(body, "body_timeout")
    with connect(gateway) as sock:  # a head that never completes: closed after the keep-alive timeout (2 s)
        started = time.monotonic()
        for _ in range(30):
            try:
                sock.send(b"G" if _ == 0 else b"E")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
        assert time.monotonic() - started < 4.5


def test_m3_connections_over_the_cap_get_503(engine: HostileEngine) -> None:
    gw = start_gateway("--endpoints", engine.url, "--max-connections", "4")
    held = [connect(gw) for _ in range(4)]
    try:
        time.sleep(0.2)
        with connect(gw) as sock:
            status, headers, body = read_answer(sock)
            assert status == 503 and headers["connection"] == "close"
            envelope(body, "too_many_connections")
        held.pop().close()
        wait_for(lambda: post(gw)[0] == 200, DEADLINE, "a free slot")
    finally:
        for sock in held:
            sock.close()
        gw.stop()


def test_413_from_content_length_without_reading_the_body(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}Content-Length: 99999999\r\n\r\n".encode())
        status, headers, body = read_answer(sock)
        assert status == 413 and headers["connection"] == "close"
        envelope(body, "body_too_large")


def test_413_for_a_chunked_body_over_the_limit(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
        try:
            for _ in range(18):  # 1.1 MiB, the limit is 1 MiB
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway may answer and stop reading before the last pieces
        status, headers, body = read_answer(sock)
        assert status == 413 and headers["connection"] == "close"
        envelope(body, "body_too_large")


def test_l3_100_continue_never_lands_inside_a_pipelined_answer(gateway: GatewayProcess) -> None:
    """A streamed answer, then a pipelined request with Expect: the 100 Continue comes after the stream ended."""
    with connect(gateway) as sock:
        first = (f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}x-mode: slow-stream\r\n"
                 f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        second = (f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}Expect: 100-continue\r\n"
                  f"Content-Length: {len(BODY)}\r\n\r\n").encode()
        sock.sendall(first + second)
        buffered = bytearray()
        status, _, body = read_answer(sock, buffered)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        sock.sendall(BODY)
        status, _, _ = read_answer(sock, buffered)
        assert status == 100  # after the whole first answer, before the second
        assert read_answer(sock, buffered)[0] == 200


def test_l5_a_non_utf8_authorization_is_401(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer \xff\xfe\x80\r\n\r\n")
        status, _, body = read_answer(sock)
        assert status == 401
        envelope(body, "invalid_api_key")


def test_l6_admin_endpoints_need_the_key(gateway: GatewayProcess) -> None:
    for path in ("/replicas", "/metrics"):
        with connect(gateway) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            assert read_answer(sock)[0] == 401
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{AUTH}\r\n".encode())
            assert read_answer(sock)[0] == 200
    with connect(gateway) as sock:  # probes need none
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock)[0] == 200


def test_l7_sigterm_ends_within_the_grace_period(engine: HostileEngine) -> None:
    gw = start_gateway("--endpoints", engine.url, "--shutdown-grace", "1")
    sock = connect(gw)
    try:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nx-mode: hang\r\n"
                     f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        sock.recv(100)  # the stream started and now hangs
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(DEADLINE)
        assert time.monotonic() - started < 1 + 2 + 1  # grace + stopping the rest + process exit
    finally:
        sock.close()
        gw.stop()


# --- the engine side -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["extra", "late-extra", "204-body"])
def test_h2_bytes_after_an_answer_never_reach_the_next_client(gateway: GatewayProcess, engine: HostileEngine,
                                                              mode: str) -> None:
    status, _, body = post(gateway, mode)
    assert status in (200, 204) and b"INJECTED" not in body
    time.sleep(0.4)  # the late bytes arrive while the connection idles in the pool
    for _ in range(3):
        status, _, body = post(gateway)
        assert status == 200 and b"INJECTED" not in body and json.loads(body)["choices"][0]["text"] == "fine"
    attacked = [conn for conn, headers in engine.requests() if headers.get("x-mode") == mode][-1]
    assert attacked.requests[-1][2]["x-mode"] == mode  # the connection was never used again


def test_l2_early_hints_are_not_the_answer(gateway: GatewayProcess) -> None:
    status, _, body = post(gateway, "103")
    assert (status, body) == (200, b'"final"')


@pytest.mark.parametrize("mode", ["huge-header", "many-headers", "huge-length"])
def test_l4_upstream_heads_and_bodies_over_the_limits_are_502(gateway: GatewayProcess, mode: str) -> None:
    status, _, body = post(gateway, mode)
    assert status == 502
    envelope(body, "upstream_failed")


def test_l4_an_endless_stream_is_cut_at_the_limit(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}x-mode: endless\r\n"
                     f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        received, cut = 0, False
        while received < 64 * 1024 * 1024 and not cut:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            received += len(data)
            cut = not data
        assert cut and received < 2 * 262144  # the limit is 256 KiB


def test_m2_a_client_that_stops_reading_frees_the_upstream_connection(gateway: GatewayProcess,
                                                                       engine: HostileEngine) -> None:
    sock = connect(gateway)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        before = len(engine.requests())
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n{AUTH}x-mode: endless\r\n"
                     f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)
        wait_for(lambda: len(engine.requests()) > before, DEADLINE, "the request upstream")
        upstream = engine.requests()[-1][0]
        # never read: the send timeout (1 s) cuts the client, which closes the upstream connection
        wait_for(lambda: upstream.closed_at is not None, DEADLINE, "the upstream connection closed")
    finally:
        sock.close()


def test_l1_hop_by_hop_forwarded_for_and_the_key(gateway: GatewayProcess) -> None:
    status, headers, body = post(gateway, extra="Connection: keep-alive, x-hop\r\nX-Hop: secret\r\n"
                                 "X-Forwarded-For: 10.1.2.3\r\nForwarded: for=10.1.2.3\r\nKeep-Alive: 5\r\n")
    assert status == 200
    seen = json.loads(body)["headers"]
    assert "x-hop" not in seen and "keep-alive" not in seen and "authorization" not in seen
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["forwarded"] == "for=10.1.2.3, for=127.0.0.1;proto=http"
    assert "x-secret-hop" not in headers and "keep-alive" not in headers  # named in the engine's Connection
    assert headers["x-pypto-replica"]
