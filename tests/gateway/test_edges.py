"""The gateway process on its own: auth, body limits, bad JSON, unknown policy, no replicas, dead replicas.

These requests are answered by the gateway itself (before or instead of an engine), so no engine is needed;
the gateway is the real `pypto-serving gateway` process. Routing to real engines: test_routing_real.py.
"""

from __future__ import annotations

import json
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.gateway.harness import GatewayProcess, start_gateway
from tests.support.common import free_port, wait_for

KEY = "s3cret-key"


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def dead_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose only endpoint has nobody listening, with an API key and a 1 KiB body limit."""
    key_file: Path = tmp_path_factory.mktemp("gw") / "key"
    key_file.write_text(KEY + "\n")
    gw = start_gateway("--endpoints", f"http://127.0.0.1:{free_port()}", "--api-key-file", str(key_file),
                       "--max-body-bytes", "1024", "--breaker-backoff", "30", ready=False)
    yield gw
    gw.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_required(dead_gateway: GatewayProcess) -> None:
    url = dead_gateway.url + "/v1/completions"
    assert_envelope(httpx.post(url, json={"prompt": "hi"}), 401, "invalid_api_key")
    assert_envelope(httpx.post(url, json={"prompt": "hi"}, headers=auth("wrong")), 401)
    assert_envelope(httpx.get(dead_gateway.url + "/v1/models", headers={"Authorization": "Basic x"}), 401)
    assert httpx.get(dead_gateway.url + "/health").status_code == 200  # probes need no key


def test_bad_input_gets_an_envelope_and_never_crashes(dead_gateway: GatewayProcess) -> None:
    url = dead_gateway.url + "/v1/completions"
    assert_envelope(httpx.post(url, content=b"{not json", headers=auth()), 400, "invalid_json")
    assert_envelope(httpx.post(url, content=b"[1, 2]", headers=auth()), 400, "invalid_json")
    assert_envelope(httpx.post(url, content=b"\xff\xfe", headers=auth()), 400, "invalid_json")
    assert_envelope(httpx.post(url, json={"prompt": "x" * 2000}, headers=auth()), 413, "body_too_large")
    error = assert_envelope(httpx.post(url, json={"prompt": "hi"}, headers={**auth(), "x-pypto-routing": "best"}),
                            400, "unknown_policy")
    assert error["param"] == "x-pypto-routing" and "prefix-aware" in error["message"]
    assert_envelope(httpx.get(dead_gateway.url + "/v2/nothing"), 404)
    assert_envelope(httpx.get(url, headers=auth()), 405)
    assert httpx.get(dead_gateway.url + "/health").status_code == 200


def test_the_gateways_own_answers_carry_a_request_id(dead_gateway: GatewayProcess) -> None:
    url = dead_gateway.url + "/v1/completions"
    rejected = httpx.post(url, content=b"{not json", headers={**auth(), "x-request-id": "client-7"})
    assert rejected.status_code == 400 and rejected.headers["x-request-id"] == "client-7"
    made = [httpx.post(url, content=b"{not json", headers=auth()).headers["x-request-id"] for _ in range(2)]
    assert len(made[0]) == 32 and made[0] != made[1]  # a fresh id per request when the client sends none
    assert httpx.get(dead_gateway.url + "/nowhere").headers["x-request-id"]  # aiohttp's 404, enveloped


def test_dead_replica_is_ejected_and_then_503_names_the_cause(dead_gateway: GatewayProcess) -> None:
    (name,) = dead_gateway.replicas()
    # failed /load polls alone eject it (no traffic needed)
    wait_for(lambda: dead_gateway.replicas()[name]["state"] == "ejected", 10, "the dead replica ejected")
    assert dead_gateway.metric("pypto_gateway_ejections_total", replica=name) >= 1
    assert httpx.get(dead_gateway.url + "/ready").status_code == 503
    error = assert_envelope(httpx.post(dead_gateway.url + "/v1/completions", json={"prompt": "hi"},
                                       headers=auth()), 503, "no_replicas")
    assert "no ready engine replica" in error["message"]


def test_cli_requires_exactly_one_discovery_source(tmp_path: Path) -> None:
    for args in ([], ["--endpoints", "http://127.0.0.1:1", "--selector", "app=x"]):
        proc = subprocess.run([sys.executable, "-m", "pypto_serving", "gateway", *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and "exactly one of --endpoints or --selector" in proc.stderr
    (tmp_path / "empty").write_text("  \n")
    proc = subprocess.run([sys.executable, "-m", "pypto_serving", "gateway", "--endpoints", "http://127.0.0.1:1",
                           "--api-key-file", str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is empty" in proc.stderr


class CookieSettingReplica(BaseHTTPRequestHandler):
    """An upstream that answers every completion with a Set-Cookie and records the Cookie headers it receives."""

    seen_cookies: list[str | None] = []

    def do_GET(self) -> None:  # /load and /health
        self._json({"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0, "draining": False})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen_cookies.append(self.headers.get("Cookie"))
        self._json({"choices": []}, {"Set-Cookie": "session=client-a-secret; Path=/"})

    def _json(self, body: dict, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(200)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def test_an_upstream_cookie_never_reaches_another_clients_request() -> None:
    """The gateway's pooled upstream session keeps no cookie jar: a Set-Cookie meant for one client is relayed to
    that client only, and is not attached to the next client's request."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), CookieSettingReplica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # a host name: aiohttp's default jar ignores cookies from IP addresses, but static endpoints may be names
    gw = start_gateway("--endpoints", f"http://localhost:{server.server_address[1]}")
    try:
        first = httpx.post(gw.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=30)
        assert first.status_code == 200 and "client-a-secret" in first.headers.get("set-cookie", "")
        second = httpx.post(gw.url + "/v1/completions", json={"prompt": "b", "max_tokens": 1}, timeout=30)
        assert second.status_code == 200
        assert CookieSettingReplica.seen_cookies == [None, None]
    finally:
        gw.stop()
        server.shutdown()


class OneRequestPerConnection(socketserver.StreamRequestHandler):
    """An upstream that answers the first request of each connection with a keep-alive answer, then closes the
    connection when the next request arrives on it, without a byte (as a replica whose keep-alive timeout ends
    while the gateway sends)."""

    connections = 0
    heads: list[bytes] = []

    def handle(self) -> None:
        type(self).connections += 1
        for answered in (False, True):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            if answered:
                return  # closes the connection
            type(self).heads.append(head)
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.rfile.read(length)
            path = head.split(b" ", 2)[1]
            payload = json.dumps({"running": 0, "waiting": 0, "pending_tokens": 0} if path == b"/load"
                                 else {"choices": []}).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(payload), payload))


def test_a_request_on_a_connection_the_replica_closed_goes_again_on_a_fresh_one() -> None:
    """Also: Expect is not forwarded (the gateway read the body; an engine would answer 100 Continue first)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), OneRequestPerConnection)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gw = start_gateway("--endpoints", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        for prompt in ("a", "b", "c"):
            resp = httpx.post(gw.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=30,
                              headers={"Expect": "100-continue"})
            assert resp.status_code == 200 and resp.json() == {"choices": []}
        assert gw.metric("pypto_gateway_retries_total") == 0  # sent again on the same replica, not a retry
        assert gw.metric("pypto_gateway_requests_total", code="200") == 3
        assert gw.metric("pypto_gateway_requests_total", code="502") == 0
        posts = [head.lower() for head in OneRequestPerConnection.heads if head.startswith(b"POST")]
        assert len(posts) == 3 and not any(b"\r\nexpect:" in head for head in posts)
    finally:
        gw.stop()
        server.shutdown()


def test_retries_stop_at_max_retries() -> None:
    """Four unreachable replicas and --max-retries 1: two are tried, then the last one's failure is the answer."""
    endpoints = ",".join(f"http://127.0.0.1:{free_port()}" for _ in range(4))
    gw = start_gateway("--endpoints", endpoints, "--max-retries", "1", "--breaker-failures", "1000", ready=False)
    try:
        assert_envelope(httpx.post(gw.url + "/v1/completions", json={"prompt": "a"}, timeout=30), 502,
                        "upstream_unreachable")
        assert gw.metric("pypto_gateway_retries_total") == 1
    finally:
        gw.stop()
