"""Shared pieces of the gateway benchmarks: real engines, the gateway, nginx as a round-robin proxy, results.

Every process is real and listens on loopback; everything started is stopped at exit.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.gateway.harness import GatewayProcess, start_gateway  # noqa: E402
from tests.support.common import free_port, wait_for  # noqa: E402
from tests.support.engines import EngineProcess, launch_engine  # noqa: E402

RESULTS_DIR = REPO_ROOT / "docs" / "benchmarks"


def start_engines(model_dir: Path, count: int, extra_args: Sequence[str], log_dir: Path) -> list[EngineProcess]:
    """Start ``count`` engines in parallel and wait for all of them."""
    engines = [launch_engine(model_dir, extra_args=list(extra_args), log_dir=log_dir) for _ in range(count)]
    for engine in engines:
        engine.wait_ready()
    return engines


def model_name(url: str) -> str:
    """The served model name of an engine or gateway."""
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def ensure_debian_tool(binary: str, package: str) -> str:
    """Path of ``binary``, installing Debian's ``package`` when it is missing."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
    return shutil.which(binary) or f"/usr/sbin/{binary}"


def ensure_wrk() -> str:
    """Path of wrk (a C HTTP load generator)."""
    return ensure_debian_tool("wrk", "wrk")


def ensure_nginx() -> str:
    """Path of the nginx binary."""
    return ensure_debian_tool("nginx", "nginx-light")


class Nginx:
    """nginx as a plain round-robin HTTP/1.1 reverse proxy with upstream keep-alive and no buffering."""

    def __init__(self, upstreams: Sequence[str], workers: int = 1) -> None:
        self.binary = ensure_nginx()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        servers = "\n".join(f"    server {u.removeprefix('http://')};" for u in upstreams)
        conf = f"""
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  upstream engines {{
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://engines;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-g", "daemon off; user root;"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: httpx.get(self.url + "/v1/models", timeout=2).status_code == 200, 30, "nginx")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def gateway(*args: str) -> GatewayProcess:
    """A `pypto-serving gateway` process."""
    return start_gateway(*args, timeout=60)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (from /proc; Linux)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += cpu_seconds(int(child))
    except OSError:
        pass
    return total


def machine() -> dict:
    """What the numbers were measured on."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(name: str, result: dict) -> Path:
    """Write ``docs/benchmarks/<name>.json`` (read by the docs generator)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return path


PEERS_VENV = Path(os.environ.get("PYPTO_PEERS_VENV", Path.home() / ".cache" / "pypto-serving" / "peers"))
def peer_commands(venv: Path, workers: list[str]) -> dict[str, list[str]]:
    """Router name -> a command line serving on {port} (formatted later); empty when the venv lacks them."""
    smg, vllm_router, sglang_router = venv / "bin" / "smg", venv / "bin" / "vllm-router", venv / "bin" / "sglang-router"
    out: dict[str, list[str]] = {}
    if smg.exists():
        for policy in ("least_load", "cache_aware", "prefix_hash"):
            out[f"smg {policy}"] = [str(smg), "launch", "--host", "127.0.0.1", "--port", "{port}", "--policy", policy,
                                    "--prometheus-port", "{metrics_port}", "--worker-urls", *workers]
    if vllm_router.exists():
        for policy in ("power_of_two", "cache_aware"):
            out[f"vllm-router {policy}"] = [str(vllm_router), "--host", "127.0.0.1", "--port", "{port}", "--policy",
                                            policy, "--prometheus-port", "{metrics_port}",
                                            "--worker-startup-check-interval", "1", "--worker-urls", *workers]
    if sglang_router.exists():
        out["sglang-router cache_aware"] = [str(sglang_router), "launch", "--host", "127.0.0.1", "--port", "{port}",
                                            "--policy", "cache_aware", "--prometheus-port", "{metrics_port}",
                                            "--worker-urls", *workers]
    return out


def gateway_command(workers: list[str], *extra: str) -> list[str]:
    """Our gateway as a router command line like the peers' (serving on {port}), for benchmarks that start each
    router only for its own runs: a router left up between them would keep watching the engines' load and take
    CPU from the other routers' runs."""
    return [sys.executable, "-m", "pypto_serving", "gateway", "--host", "127.0.0.1", "--port", "{port}",
            "--endpoints", ",".join(workers), *extra]


class PeerRouter:
    """One router process (a peer's, or ours from `gateway_command`), serving until stopped."""

    def __init__(self, command: list[str], log: Path) -> None:
        port, metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [a.format(port=port, metrics_port=metrics_port) for a in command]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=REPO_ROOT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                return True  # exited: reported below, at once
            try:
                return httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, f"{Path(argv[0]).name} to serve")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(2.0)  # their health and load monitors run every second

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
