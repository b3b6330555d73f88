"""Start and stop a local cluster in a directory: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and the node agent, as background processes with all state, logs and pids under that directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from hack.localkube import pki, processes, tools
from hack.localkube.kubeclient import Credentials, KubeClient
from hack.localkube.node.config import NodeShape

SERVICE_CIDR = "127.253.0.0/16"  # loopback on purpose: nothing serves it, so no packet ever leaves the machine
KUBERNETES_SERVICE_IP = "127.253.0.1"
CLUSTER_NAME = "localkube"
PORT_ATTEMPTS = 3  # free ports are picked before the components bind them: another process may win the race
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent")


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message names the component and shows the end of its log."""


@dataclass(kw_only=True)
class ClusterConfig(NodeShape):
    """What the cluster looks like: nodes and their device plugin resource, node-agent timings, pod env."""

    die_with_parent: bool = False  # test clusters: processes get SIGKILL if the process that started them dies
    extra_pod_env_prefixes: list[str] = field(default_factory=lambda: ["PYPTO_", "HF_", "TRANSFORMERS_", "TORCH"])


@dataclass
class Ports:
    """The loopback ports one cluster uses (chosen free at start, so clusters can coexist)."""

    etcd_client: int = 0
    etcd_peer: int = 0
    apiserver: int = 0
    controller_manager: int = 0
    scheduler: int = 0
    kubelet: int = 0

    def fill(self) -> None:
        """Keep ports that are still free, pick new free ones for the rest."""
        for name, port in asdict(self).items():
            if not port or not _port_free(port):
                setattr(self, name, _free_port())


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def _progress(message: str) -> None:
    print(f"==> [localkube] {message}", file=sys.stderr, flush=True)


class LocalCluster:
    """A local Kubernetes cluster rooted at ``directory`` (created if missing).

    ``up()`` starts it (or finds it running) and returns once the API answers and every node is Ready;
    ``down()`` stops every process it started, pod processes included.
    """

    def __init__(self, directory: Path | str, config: ClusterConfig | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.config = config or ClusterConfig()
        self.ports = Ports()
        self.pki_dir = self.dir / "pki"
        self.logs_dir = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"
        self.state_file = self.dir / "cluster.json"
        self._procs: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- state
    @property
    def server(self) -> str:
        """The apiserver URL."""
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, pids: dict[str, int]) -> None:
        state = {"ports": asdict(self.ports), "config": asdict(self.config), "pids": pids, "server": self.server,
                 "kubeconfig": str(self.kubeconfig), "started": time.time()}
        self.state_file.write_text(json.dumps(state, indent=2))

    def admin_credentials(self) -> Credentials:
        """Client-certificate credentials of the cluster admin (group system:masters)."""
        return Credentials(self.server, self.pki_dir / "ca.crt", self.pki_dir / "admin.crt", self.pki_dir / "admin.key")

    def is_running(self) -> bool:
        """True if the recorded processes are alive and the API answers."""
        state = self._load_state()
        pids = state.get("pids") or {}
        if not pids or not all(processes.is_alive(pid) for pid in pids.values()):
            return False
        self.ports = Ports(**state["ports"])
        return self._api_ready()

    # ----------------------------------------------------------------------------------------------- up
    def up(self, timeout: float = 240.0) -> LocalCluster:
        """Start the cluster (idempotent) and wait until the API answers and all nodes are Ready."""
        if self.is_running():
            _progress(f"cluster in {self.dir} is already running at {self.server}")
            return self
        started = time.monotonic()
        deadline = started + timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        leftovers = processes.stop_marked(self.dir, grace=3)
        if leftovers:
            _progress(f"stopped {leftovers} leftover processes of an earlier run in {self.dir}")
        self.ports = Ports(**self._load_state().get("ports", {}))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.ports.fill()
            try:
                self._start_all(deadline)
                break
            except ClusterStartError as exc:
                self.down()
                if "address already in use" not in str(exc).lower() or attempt == PORT_ATTEMPTS:
                    raise
                _progress(f"a port was taken meanwhile ({exc.args[0].splitlines()[0]}); retrying with new ports")
                self.ports = Ports()
            except BaseException:
                self.down()
                raise
        self._save_state({name: proc.pid for name, proc in self._procs.items()})
        _progress(f"cluster ready at {self.server} in {time.monotonic() - started:.1f}s; "
                  f"KUBECONFIG={self.kubeconfig}")
        return self

    def _start_all(self, deadline: float) -> None:
        self._write_pki()
        self._start_etcd(deadline)
        self._start_apiserver(deadline)
        self._write_kubeconfigs()
        self._start_controller_manager(deadline)
        self._start_scheduler(deadline)
        self._start_node_agent(deadline)
        self._wait_default_service_account(deadline)

    def _write_pki(self) -> None:
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        ca = pki.create_ca(self.pki_dir)
        pki.issue(ca, self.pki_dir, "apiserver", "kube-apiserver", server=True,
                  dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                             "kubernetes.default.svc.cluster.local"),
                  ip_addresses=("127.0.0.1", KUBERNETES_SERVICE_IP))
        pki.issue(ca, self.pki_dir, "admin", "localkube-admin", organization="system:masters", client=True)
        pki.issue(ca, self.pki_dir, "apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                  organization="system:masters", client=True)
        pki.issue(ca, self.pki_dir, "controller-manager", "system:kube-controller-manager", client=True)
        pki.issue(ca, self.pki_dir, "scheduler", "system:kube-scheduler", client=True)
        pki.issue(ca, self.pki_dir, "kubelet", "localkube-kubelet", server=True,
                  dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        front_proxy = pki.create_ca(self.pki_dir, "front-proxy-ca", "localkube-front-proxy-ca")
        pki.issue(front_proxy, self.pki_dir, "front-proxy-client", "front-proxy-client", client=True)
        pki.create_service_account_keys(self.pki_dir)

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = processes.clean_environment(self.dir, extra_env)
        log = self.logs_dir / f"{name}.log"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            handle.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(args)}\n".encode())
        self._procs[name] = processes.spawn(args, log_path=log, env=env, cwd=self.dir,
                                            die_with_parent=self.config.die_with_parent)

    def _wait(self, name: str, check: Any, deadline: float, what: str) -> None:
        _progress(f"waiting for {what}")
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterStartError(self._failure(name, f"{name} exited with code {proc.returncode}"))
            try:
                if check():
                    return
            except Exception as exc:  # the component is still starting
                last_error = exc
            time.sleep(0.25)
        raise ClusterStartError(self._failure(name, f"timed out waiting for {what} (last error: {last_error!r})"))

    def _failure(self, name: str, reason: str) -> str:
        log = self.logs_dir / f"{name}.log"
        return (f"local cluster in {self.dir} failed to start: {reason}\n--- last lines of {log} ---\n{_tail(log)}\n"
                f"--- next steps: read {self.logs_dir}/*.log; make sure `make tools` succeeded; "
                f"`python -m hack.localkube down --dir {self.dir}` cleans up ---")

    def _start_etcd(self, deadline: float) -> None:
        p = self.ports
        data = self.dir / "etcd"
        self._spawn("etcd", [
            str(tools.etcd_binary()), "--name", "localkube", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{p.etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{p.etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-cluster", f"localkube=http://127.0.0.1:{p.etcd_peer}",
            "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
        ])

        def healthy() -> bool:
            response = httpx.get(f"http://127.0.0.1:{p.etcd_client}/health", timeout=2, trust_env=False)
            return response.status_code == 200 and response.json().get("health") == "true"

        self._wait("etcd", healthy, deadline, f"etcd on 127.0.0.1:{p.etcd_client}")

    def _start_apiserver(self, deadline: float) -> None:
        p, k = self.ports, self.pki_dir
        admission = ("NamespaceLifecycle,LimitRanger,ServiceAccount,NodeRestriction,TaintNodesByCondition,Priority,"
                     "DefaultTolerationSeconds,DefaultStorageClass,StorageObjectInUseProtection,"
                     "PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,CertificateSigning,"
                     "CertificateSubjectRestriction,DefaultIngressClass,MutatingAdmissionWebhook,"
                     "ValidatingAdmissionWebhook,ResourceQuota")
        self._spawn("kube-apiserver", [
            str(tools.k8s_binary("kube-apiserver")),
            "--etcd-servers", f"http://127.0.0.1:{p.etcd_client}",
            "--bind-address", "127.0.0.1", "--secure-port", str(p.apiserver),
            "--advertise-address", "127.0.0.1", "--endpoint-reconciler-type", "none",
            "--tls-cert-file", str(k / "apiserver.crt"), "--tls-private-key-file", str(k / "apiserver.key"),
            "--client-ca-file", str(k / "ca.crt"),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", admission,
            "--service-account-key-file", str(k / "sa.pub"),
            "--service-account-signing-key-file", str(k / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--kubelet-client-certificate", str(k / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(k / "apiserver-kubelet-client.key"),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
            "--requestheader-client-ca-file", str(k / "front-proxy-ca.crt"),
            "--requestheader-allowed-names", "front-proxy-client",
            "--requestheader-username-headers", "X-Remote-User", "--requestheader-group-headers", "X-Remote-Group",
            "--requestheader-extra-headers-prefix", "X-Remote-Extra-",
            "--proxy-client-cert-file", str(k / "front-proxy-client.crt"),
            "--proxy-client-key-file", str(k / "front-proxy-client.key"),
            "--allow-privileged=true", "--profiling=false", "--event-ttl", "1h",
        ])
        client = KubeClient(self.admin_credentials(), timeout=5)
        try:
            self._wait("kube-apiserver", lambda: client.request("GET", "/readyz") is not None, deadline,
                       f"kube-apiserver on {self.server}")
        finally:
            client.close()

    def _kubeconfig(self, user: str, cert: str) -> dict[str, Any]:
        import base64

        def data(name: str) -> str:
            return base64.b64encode((self.pki_dir / name).read_bytes()).decode()

        return {
            "apiVersion": "v1", "kind": "Config", "current-context": CLUSTER_NAME, "preferences": {},
            "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": self.server,
                                                            "certificate-authority-data": data("ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate-data": data(f"{cert}.crt"),
                                              "client-key-data": data(f"{cert}.key")}}],
            "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user,
                                                            "namespace": "default"}}],
        }

    def _write_kubeconfigs(self) -> None:
        files = {self.kubeconfig: ("localkube-admin", "admin"),
                 self.pki_dir / "controller-manager.kubeconfig": ("system:kube-controller-manager",
                                                                  "controller-manager"),
                 self.pki_dir / "scheduler.kubeconfig": ("system:kube-scheduler", "scheduler")}
        for path, (user, cert) in files.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(self._kubeconfig(user, cert), sort_keys=False))
            tmp.chmod(0o600)
            os.replace(tmp, path)

    def _healthz(self, port: int) -> bool:
        response = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2, trust_env=False)
        return response.status_code == 200

    def _start_controller_manager(self, deadline: float) -> None:
        k, kubeconfig = self.pki_dir, str(self.pki_dir / "controller-manager.kubeconfig")
        self._spawn("kube-controller-manager", [
            str(tools.k8s_binary("kube-controller-manager")),
            "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig,
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports.controller_manager), "--port=0",
            "--leader-elect=false", "--controllers", "*,bootstrapsigner,tokencleaner,-nodelifecycle",
            "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(k / "sa.key"), "--root-ca-file", str(k / "ca.crt"),
            "--cluster-signing-cert-file", str(k / "ca.crt"), "--cluster-signing-key-file", str(k / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allocate-node-cidrs=false",
            "--concurrent-gc-syncs", "10",
        ])
        self._wait("kube-controller-manager", lambda: self._healthz(self.ports.controller_manager), deadline,
                   f"kube-controller-manager healthz on 127.0.0.1:{self.ports.controller_manager}")

    def _start_scheduler(self, deadline: float) -> None:
        kubeconfig = str(self.pki_dir / "scheduler.kubeconfig")
        self._spawn("kube-scheduler", [
            str(tools.k8s_binary("kube-scheduler")),
            "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig,
            "--bind-address", "127.0.0.1", "--secure-port", str(self.ports.scheduler), "--port=0",
            "--leader-elect=false",
        ])
        self._wait("kube-scheduler", lambda: self._healthz(self.ports.scheduler), deadline,
                   f"kube-scheduler healthz on 127.0.0.1:{self.ports.scheduler}")

    def _start_node_agent(self, deadline: float) -> None:
        c, k = self.config, self.pki_dir
        boot_id = uuid.uuid4().hex
        config = {
            "cluster_dir": str(self.dir), "server": self.server, "ca_file": str(k / "ca.crt"),
            "cert_file": str(k / "admin.crt"), "key_file": str(k / "admin.key"),
            "kubelet_cert_file": str(k / "kubelet.crt"), "kubelet_key_file": str(k / "kubelet.key"),
            "kubelet_port": self.ports.kubelet, **c.node_shape(),
            "path_prefix": str(Path(sys.executable).parent), "env_prefixes": c.extra_pod_env_prefixes,
            "image_paths": sorted({sys.prefix, sys.base_prefix, str(tools.REPO_ROOT)}),
            "boot_id": boot_id,
        }
        config_file = self.dir / "node-agent.json"
        config_file.write_text(json.dumps(config, indent=2))
        pythonpath = os.pathsep.join(filter(None, [str(tools.REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._spawn("node-agent", [sys.executable, "-m", "hack.localkube.node", "--config", str(config_file)],
                    {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"})
        client = KubeClient(self.admin_credentials(), timeout=5)

        def nodes_ready() -> bool:
            listed = client.get("/api/v1/nodes") or {}
            ready = [node for node in listed.get("items", [])
                     if node["status"].get("nodeInfo", {}).get("bootID") == boot_id  # this start's, not stale
                     and any(cond["type"] == "Ready" and cond["status"] == "True"
                             for cond in node.get("status", {}).get("conditions", []))]
            return len(ready) >= c.nodes

        try:
            self._wait("node-agent", nodes_ready, deadline, f"{c.nodes} Ready nodes from the node agent")
        finally:
            client.close()

    def _wait_default_service_account(self, deadline: float) -> None:
        client = KubeClient(self.admin_credentials(), timeout=5)

        def token_ready() -> bool:
            account = client.get("/api/v1/namespaces/default/serviceaccounts/default", ok_missing=True)
            return bool(account and account.get("secrets"))

        try:
            self._wait("kube-controller-manager", token_ready, deadline,
                       "the default ServiceAccount and its token (token controller)")
        finally:
            client.close()

    def _api_ready(self) -> bool:
        client = KubeClient(self.admin_credentials(), timeout=3)
        try:
            client.request("GET", "/readyz")
            return True
        except Exception:
            return False
        finally:
            client.close()

    # ----------------------------------------------------------------------------------------------- restart
    def restart_component(self, name: str, downtime: float = 0.0, timeout: float = 120.0) -> float:
        """Stop one control-plane component of the running cluster (SIGTERM, SIGKILL after 5 s), keep it down for
        ``downtime`` seconds, start it again with the same ports, flags and data, and return once it is healthy.
        Returns the seconds it was unavailable. ``name``: etcd, kube-apiserver, kube-controller-manager or
        kube-scheduler. With ``die_with_parent`` the new process dies with the calling *thread*: call it from a
        thread that outlives the cluster (e.g. the main thread)."""
        starters = {"etcd": self._start_etcd, "kube-apiserver": self._start_apiserver,
                    "kube-controller-manager": self._start_controller_manager, "kube-scheduler": self._start_scheduler}
        if name not in starters:
            raise ValueError(f"cannot restart {name!r}; restartable: {', '.join(starters)}")
        if not self.is_running():
            raise ClusterStartError(f"the cluster in {self.dir} is not running")
        pids = dict(self._load_state().get("pids") or {})
        started = time.monotonic()
        _progress(f"stopping {name} (pid {pids[name]})")
        processes.terminate([pids[name]], 5.0)
        old = self._procs.pop(name, None)
        if old is not None:
            old.poll()  # reap it
        if downtime > 0:
            time.sleep(downtime)
        starters[name](time.monotonic() + timeout)
        pids[name] = self._procs[name].pid
        self._save_state(pids)
        elapsed = time.monotonic() - started
        _progress(f"{name} restarted (pid {pids[name]}) after {elapsed:.1f}s")
        return elapsed

    # ----------------------------------------------------------------------------------------------- down
    def down(self, purge: bool = False, grace: float = 10.0) -> int:
        """Stop the node agent (which stops the pods), then the control plane, then anything left that carries
        this cluster's marker; with ``purge`` also delete the directory. Returns how many processes were stopped."""
        state = self._load_state()
        pids = {**state.get("pids", {}), **{name: proc.pid for name, proc in self._procs.items()}}
        stopped = 0
        for name in reversed(COMPONENTS):  # node agent first: it stops pod processes gracefully
            pid = pids.get(name)
            if pid and processes.process_marker(pid) == str(self.dir):
                processes.terminate([pid], grace if name == "node-agent" else 5.0)
                stopped += 1
        stopped += processes.stop_marked(self.dir, grace=2)
        self._remove_memory_volumes()
        for proc in self._procs.values():
            proc.poll()
        self._procs.clear()
        if state:  # keep the ports for the next start (so the kubeconfig stays valid), forget the pids
            self.state_file.write_text(json.dumps({**state, "pids": {}}, indent=2))
        if purge and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

    def _remove_memory_volumes(self) -> None:
        """Delete leftover emptyDir(medium: Memory) data in /dev/shm of this cluster's pods (after an agent crash)."""
        for pod_dir in (self.dir / "pods").glob("*_*_*"):
            uid = pod_dir.name.rsplit("_", 1)[-1]
            for leftover in Path("/dev/shm").glob(f"localkube-{uid}-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of every component log (for failure messages)."""
        return "\n".join(f"--- {log} ---\n{_tail(log, lines)}" for log in sorted(self.logs_dir.glob("*.log")))
