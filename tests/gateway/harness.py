"""A real `pypto-serving gateway` process for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.common import REPO_ROOT, free_port, wait_for


@dataclass
class GatewayProcess:
    """A running gateway: ``url``, its log file, and helpers to read /replicas and /metrics."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)
    api_key: str | None = None  # from --api-key-file: /replicas and /metrics need it

    @property
    def admin_headers(self) -> dict[str, str]:
        """The headers /replicas and /metrics need (the API key, when the gateway has one)."""
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def replicas(self) -> dict[str, dict]:
        """GET /replicas keyed by replica name."""
        data = httpx.get(self.url + "/replicas", headers=self.admin_headers, timeout=5).json()
        return {r["name"]: r for r in data["replicas"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", headers=self.admin_headers,
                                                                          timeout=5).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log(self) -> str:
        """The gateway's output so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_gateway(*args: str, host: str = "127.0.0.1", port: int | None = None, ready: bool = True,
                  env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = REPO_ROOT) -> GatewayProcess:
    """Start `pypto-serving gateway ARGS` on a free port and wait for /health (and /ready when ``ready``).
    ``cwd``: a folder with another copy of the ``pypto_serving`` package to run (benchmarks/gateway_ab.py)."""
    port = port or free_port(host)
    fd, log_name = tempfile.mkstemp(prefix="gateway-", suffix=".log")
    cmd = [sys.executable, "-m", "pypto_serving", "gateway", "--host", host, "--port", str(port), *args]
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    key = Path(args[args.index("--api-key-file") + 1]).read_text().strip() if "--api-key-file" in args else None
    gw = GatewayProcess(proc, f"http://{host}:{port}", Path(log_name), list(args), key)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
        return httpx.get(gw.url + ("/ready" if ready else "/health"), timeout=2).status_code == 200

    try:
        wait_for(up, timeout, f"gateway on {gw.url}")
    except BaseException:
        gw.stop()
        raise
    return gw
