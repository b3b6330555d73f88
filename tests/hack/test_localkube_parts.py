"""The node agent's parts on their own (no cluster): env expansion, phases, allocation, probes, real mounts."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.localkube.node.allocation import AddressPool, AllocationError, DevicePool, claim_subnet
from hack.localkube.node.env import expand, expand_command, field_value, parse_quantity
from hack.localkube.node.probes import Prober, ProbeTarget
from hack.localkube.node.status import compute_phase
from hack.localkube.node.volumes import Mount, container_command, write_mount_plan
from tests.support.common import free_port


def test_expand_follows_kubernetes_rules() -> None:
    env = {"POD_IP": "127.30.1.2", "N": "4"}
    assert expand("$(POD_IP):8000", env) == "127.30.1.2:8000"
    assert expand("$$(POD_IP) $(MISSING)", env) == "$(POD_IP) $(MISSING)"
    container = {"command": ["serve", "--host", "$(POD_IP)"], "args": ["--tp", "$(N)"]}
    assert expand_command(container, env) == ["serve", "--host", "127.30.1.2", "--tp", "4"]
    assert expand_command({"args": ["sleep", "1"]}, env) == ["sleep", "1"]


def test_field_refs_and_quantities() -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "1"}},
           "spec": {"nodeName": "local-node-1"}}
    assert field_value(pod, "status.podIP", "127.30.1.2", "127.30.0.1") == "127.30.1.2"
    assert field_value(pod, "metadata.labels['a']", "", "") == "1"
    assert field_value(pod, "spec.nodeName", "", "") == "local-node-1"
    assert parse_quantity("500m") == pytest.approx(0.5)
    assert parse_quantity("2Gi") == 2 * 1024**3


def _status(state: dict, restarts: int = 0, last: dict | None = None) -> dict:
    return {"name": "c", "state": state, "restartCount": restarts, "lastState": last or {}, "ready": False}


def test_phase_like_the_kubelet() -> None:
    waiting = _status({"waiting": {"reason": "ContainerCreating"}})
    running = _status({"running": {}})
    crashed = _status({"waiting": {"reason": "CrashLoopBackOff"}}, 2, {"terminated": {"exitCode": 1}})
    ok, failed = _status({"terminated": {"exitCode": 0}}), _status({"terminated": {"exitCode": 3}})
    assert compute_phase("Always", [], True, [waiting]) == "Pending"
    assert compute_phase("Always", [], False, [running]) == "Pending"
    assert compute_phase("Always", [], True, [running, waiting]) == "Pending"
    assert compute_phase("Always", [], True, [crashed]) == "Running"
    assert compute_phase("Never", [], True, [ok]) == "Succeeded"
    assert compute_phase("Never", [], True, [ok, failed]) == "Failed"
    assert compute_phase("OnFailure", [], True, [failed]) == "Running"
    assert compute_phase("Never", [failed], False, [waiting]) == "Failed"


def test_devices_are_distinct_and_bounded() -> None:
    pool = DevicePool(8)
    first = pool.allocate("pod-a", "engine", 4)
    second = pool.allocate("pod-b", "engine", 4)
    assert len(set(first) | set(second)) == 8
    assert pool.allocate("pod-a", "engine", 4) == first  # idempotent for the same container
    with pytest.raises(AllocationError):
        pool.allocate("pod-c", "engine", 1)
    assert first == [0, 1, 2, 3]
    pool.release("pod-a")
    assert pool.allocate("pod-c", "engine", 2, preferred=[3, 2]) == [2, 3]
    assert pool.allocate("pod-d", "engine", 2) == [0, 1]
    assert pool.in_use() == 8


def test_addresses_are_unique_loopback_and_not_reused_at_once() -> None:
    pool = AddressPool(77)
    assert pool.node_ip(2) == "127.77.0.2"
    a, b = pool.allocate("a"), pool.allocate("b")
    assert a != b and a.startswith("127.77.") and not a.startswith("127.77.0.")
    pool.release("a")
    assert pool.allocate("c") not in (a, b)


def test_subnet_claims_exclude_each_other(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    octet_a, fd_a = claim_subnet(tmp_path / "a")
    octet_b, fd_b = claim_subnet(tmp_path / "b")
    try:
        assert octet_a != octet_b
        assert (tmp_path / "a" / "pod-subnet-octet").read_text() == str(octet_a)
    finally:
        os.close(fd_a)
        os.close(fd_b)


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict]]:
    """A real HTTP server on loopback whose /health answers with the status code in ``state``."""
    state = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["code"])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port, state
    server.shutdown()
    server.server_close()


def test_http_probe_thresholds(http_server: tuple[int, dict]) -> None:
    port, state = http_server
    target = ProbeTarget("127.0.0.1", {"http": port}, {})
    prober = Prober("liveness", {"httpGet": {"path": "/health", "port": "http"}, "failureThreshold": 2,
                                 "periodSeconds": 1}, started_at=0.0)
    assert prober.run(target, now=0.0) is True
    state["code"] = 503
    assert prober.run(target, now=1.0) is True  # one failure is below the threshold
    assert prober.run(target, now=2.0) is False
    assert "503" in prober.last_message
    state["code"] = 200
    assert prober.run(target, now=3.0) is True
    tcp = Prober("readiness", {"tcpSocket": {"port": free_port()}, "failureThreshold": 1}, started_at=0.0)
    assert tcp.run(target, now=0.0) is False


def test_mount_plan_binds_volumes_in_a_private_namespace(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "greeting").write_text("hello from the volume\n")
    target = f"/tmp/localkube-mount-test-{os.getpid()}"
    plan = write_mount_plan(tmp_path / "mounts.json", [Mount(volume, target, read_only=True)], working_dir=target)
    command = ["sh", "-c", "cat greeting; touch x 2>/dev/null || echo read-only"]
    result = subprocess.run(container_command(plan, command), capture_output=True, text=True, timeout=30, check=False)
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["hello from the volume", "read-only"]
        assert not any(Path(target).iterdir())  # the mount never showed on the host
    finally:
        Path(target).rmdir()


def test_a_mount_over_an_ancestor_of_later_sources_does_not_hide_them(tmp_path: Path) -> None:
    """Volumes live under the cluster dir (here under /tmp); an emptyDir mounted at /tmp comes first (parents
    before children) and would shadow them. A configMap-like dir, a token file (subPath-style file source) and a
    read-only dir below the new /tmp must all still show their own contents."""
    assert str(tmp_path).startswith("/tmp/")
    scratch, config, token_dir = tmp_path / "scratch", tmp_path / "config", tmp_path / "token"
    for directory in (scratch, config, token_dir):
        directory.mkdir()
    (config / "mode").write_text("fast\n")
    (token_dir / "token").write_text("t0ken\n")
    name = f"localkube-shadow-{os.getpid()}"
    mounts = [Mount(scratch, "/tmp", read_only=False),
              Mount(token_dir / "token", f"/var/tmp/{name}/token", read_only=True),
              Mount(config, "/tmp/config", read_only=True)]
    plan = write_mount_plan(tmp_path / "mounts.json", mounts, working_dir="/tmp/work")
    script = ("cat /tmp/config/mode /var/tmp/$N/token; pwd; ls /tmp | sort | tr '\\n' ' '; echo; "
              "touch /tmp/config/x 2>/dev/null || echo config read-only")
    result = subprocess.run(container_command(plan, ["sh", "-c", script]), env={**os.environ, "N": name},
                            capture_output=True, text=True, timeout=30, check=False)
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["fast", "t0ken", "/tmp/work", "config work ",
                                              "config read-only"]
        assert sorted(p.name for p in scratch.iterdir()) == ["config", "work"]  # mount points made in the emptyDir
        assert Path(f"/var/tmp/{name}/token").read_text() == ""  # the host keeps the empty mount point only
    finally:
        Path(f"/var/tmp/{name}/token").unlink(missing_ok=True)
        Path(f"/var/tmp/{name}").rmdir()


def test_an_image_directory_hidden_by_a_volume_is_bound_back(tmp_path: Path) -> None:
    """The pods' "image" is the project environment; with the checkout under /tmp (as a CI clone may be) an
    emptyDir at /tmp would hide the interpreter the container runs. The image dir is bound back inside the volume;
    the rest of the host's /tmp stays hidden."""
    assert str(tmp_path).startswith("/tmp/")
    scratch, image = tmp_path / "scratch", tmp_path / "env" / "venv"
    scratch.mkdir()
    (image / "bin").mkdir(parents=True)
    tool = image / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    (tmp_path / "host-only").write_text("x")
    plan = write_mount_plan(tmp_path / "mounts.json", [Mount(scratch, "/tmp", read_only=False)],
                            image=[str(image), str(tmp_path / "absent")])
    script = f"{tool}; ls {tmp_path} | sort | tr '\\n' ' '"
    result = subprocess.run(container_command(plan, ["sh", "-c", script]), capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["tool ran", "env "]  # host-only, scratch and mounts.json stay hidden
    assert not (tool.parent / "x").exists()


def test_mount_helper_reports_a_missing_source_and_a_missing_command(tmp_path: Path) -> None:
    plan = write_mount_plan(tmp_path / "mounts.json", [Mount(tmp_path / "absent", "/tmp/nowhere", False)])
    result = subprocess.run(container_command(plan, ["true"]), capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 1 and "volume source" in result.stderr and "absent" in result.stderr
    plan = write_mount_plan(tmp_path / "mounts.json", [])
    result = subprocess.run(container_command(plan, ["/nonexistent/binary"]), capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 127 and "exec /nonexistent/binary" in result.stderr
