"""Nothing listens on all interfaces by default outside a pod: the engine, the gateway and the operator started
with their default address flags bind loopback only (checked on the live sockets with psutil)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.common import free_port, wait_for

pytestmark = pytest.mark.cluster
BIN = str(Path(sys.executable).parent / "pypto-serving")


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state of a process and its children."""
    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                out.append((conn.laddr.ip, conn.laddr.port))
    return out


def test_default_binds_are_loopback_only(cluster: Any, namespace: str, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    env = {**cluster.host_env, "HF_HUB_OFFLINE": "1"}
    engine_port = free_port()
    # Default address flags everywhere; only ports are given (free ones) so that parallel runs cannot collide.
    commands = {
        "engine": [BIN, "engine", "--model", str(tiny_qwen3_dir), "--port", str(engine_port), "--max-model-len", "128"],
        "gateway": [BIN, "gateway", "--port", str(free_port()), "--endpoints", f"http://127.0.0.1:{engine_port}"],
        "operator": [BIN, "operator", "--namespace", namespace, "--no-leader-elect", "--health-port", str(free_port()),
                     "--webhook-mode", "url", "--webhook-port", str(free_port()), "--webhook-config-name",
                     f"listen-test-{namespace}", "--webhook-failure-policy", "Ignore"],
    }
    expected = {"engine": 1, "gateway": 1, "operator": 2}  # the operator: health/metrics and the webhook
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            with open(tmp_path / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
        for name, proc in procs.items():
            def up(name: str = name, proc: subprocess.Popen[bytes] = proc) -> bool:
                assert proc.poll() is None, f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
                return len(listening(proc.pid)) >= expected[name]
            wait_for(up, 180, f"{name} to listen")
        for name, proc in procs.items():
            for address, port in listening(proc.pid):
                assert address not in ("0.0.0.0", "::"), f"{name} listens on all interfaces ({address}:{port})"
                assert ipaddress.ip_address(address).is_loopback, f"{name} listens on {address}:{port}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
