"""The part of the kubelet's HTTPS API that `kubectl logs` needs: ``/containerLogs/<ns>/<pod>/<container>``
(with ``previous``, ``tailLines``, ``limitBytes`` and ``follow``), plus ``/healthz``. Served on each node's
InternalIP at the node's kubelet port; exec, attach and port-forward are not supported."""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from hack.localkube.node.agent import NodeAgent


def container_log_files(pods_dir: Path, namespace: str, pod: str, container: str) -> list[Path]:
    """Log files of a container, oldest first (one per start), from the newest pod with that name."""
    candidates = sorted(pods_dir.glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    for pod_dir in reversed(candidates):
        files = list((pod_dir / "logs" / container).glob("*.log"))
        if files:
            return sorted(files, key=lambda f: int(f.stem) if f.stem.isdigit() else -1)
    return []


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["healthz"]:
            self._send(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(404, b"not supported by the localkube node agent (only containerLogs)\n")
            return
        _, namespace, pod, container = parts
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        files = container_log_files(self.server.agent.config.dir / "pods", namespace, pod, container)
        previous = query.get("previous") == "true"
        if len(files) < (2 if previous else 1):
            self._send(400 if previous else 404,
                       f'previous terminated container "{container}" in pod "{pod}" not found\n'.encode()
                       if previous else f'container "{container}" in pod "{pod}" has no logs\n'.encode())
            return
        path = files[-2] if previous else files[-1]
        data = path.read_bytes()
        if "tailLines" in query:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) > 0 else b""
        if "limitBytes" in query:
            data = data[: int(query["limitBytes"])]
        if query.get("follow") != "true" or previous:
            self._send(200, data)
            return
        self._follow(path, data, namespace, pod, container)

    def _follow(self, path: Path, first: bytes, namespace: str, pod: str, container: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            if data:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        try:
            chunk(first)
            offset = path.stat().st_size
            while True:  # until the container's process (this log file's run) is over
                worker = self.server.agent.find_worker(namespace, pod)
                running = self.server.agent.running and worker is not None and worker.container_running(container)
                size = path.stat().st_size
                if size > offset:
                    with open(path, "rb") as handle:
                        handle.seek(offset)
                        chunk(handle.read(size - offset))
                    offset = size
                if not running:
                    break
                time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: NodeAgent


class KubeletServer:
    """The HTTPS server of one node."""

    def __init__(self, agent: NodeAgent, node: str, address: str) -> None:
        config = agent.config
        self.server = _Server((address, config.kubelet_port), _Handler)
        self.server.agent = agent
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(config.kubelet_cert_file, config.kubelet_key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"kubelet-api-{node}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
