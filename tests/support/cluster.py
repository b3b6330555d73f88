"""Shared test fixtures: the real local Kubernetes cluster (session scoped) and a fresh namespace per test.

``cluster`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the localkube node agent
(hack/localkube) in a temporary directory, or reuses the cluster in ``$PYPTO_TEST_CLUSTER_DIR`` (e.g.
``.work/cluster`` from ``make cluster-up``; left running afterwards). It fails loudly, never skips, when the
cluster cannot start. Pods get loopback IPs (127.N.x.y) and there is no kube-proxy: reach pods by pod IP.
Tests that use it are marked ``@pytest.mark.cluster``. A cluster started here restarts crashing containers
after 2 s, 4 s, ... 20 s (the kubelet's back-off is 10 s ... 300 s; a reused cluster keeps its own).
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hack.localkube import ClusterConfig, ClusterStartError, LocalCluster
from hack.localkube.tools import MissingToolError, helm_binary, kubectl_binary
from tests.support.common import REPO_ROOT, wait_for

REUSE_ENV = "PYPTO_TEST_CLUSTER_DIR"
CRD_NAME = "pyptoservings.serving.pypto.io"


@dataclass
class Cluster:
    """A running local cluster, as tests see it."""

    local: LocalCluster
    owned: bool = True  # started by this test session (and stopped at its end)
    _clients: list[Any] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        """The cluster directory (state, logs, pod dirs)."""
        return self.local.dir

    @property
    def kubeconfig(self) -> Path:
        """Path of the admin kubeconfig."""
        return self.local.kubeconfig

    @property
    def server(self) -> str:
        """The apiserver URL (https://127.0.0.1:PORT)."""
        return self.local.server

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG, for subprocesses (kubectl, helm, the operator run outside the cluster)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    @property
    def host_env(self) -> dict[str, str]:
        """``env`` for a part run as a host process outside any pod: unbuffered output, and no POD_IP or
        POD_NAMESPACE inherited from a test run that itself happens to run in a pod."""
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        env.pop("POD_IP", None)
        env.pop("POD_NAMESPACE", None)
        return env

    def install_crd(self) -> str:
        """Apply the PyptoServing CRD (crds/) and wait until it is Established; returns its name."""
        self.kubectl("apply", "-f", str(REPO_ROOT / "crds" / f"{CRD_NAME}.yaml"))
        self.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
        return CRD_NAME

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with ``check`` a failure raises with its output."""
        command = [str(kubectl_binary()), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster."""
        command = [str(helm_binary()), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for this cluster (closed at session end)."""
        from kubernetes import config

        client = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(client)
        return client

    def core_v1(self) -> Any:
        """``kubernetes.client.CoreV1Api`` for this cluster."""
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def apps_v1(self) -> Any:
        """``kubernetes.client.AppsV1Api`` for this cluster."""
        from kubernetes import client

        return client.AppsV1Api(self.api_client())

    def create_namespace(self, prefix: str = "test", labels: dict[str, str] | None = None) -> str:
        """Create a uniquely named namespace and wait until its default ServiceAccount has a token (pods
        created before that are rejected by the ServiceAccount admission plugin)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        core = self.core_v1()
        core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})

        def token_ready() -> bool:
            account = core.read_namespaced_service_account("default", name)
            return bool(account.secrets)

        wait_for(token_ready, 60, f"the default ServiceAccount token in namespace {name}")
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 120) -> None:
        """Delete a namespace (its pods get their graceful termination); optionally wait until it is gone."""
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
        if wait:
            wait_for(lambda: self.kubectl("get", "namespace", name, check=False).returncode != 0, timeout,
                     f"namespace {name} to be deleted")

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """The node agent's directory of the newest pod with this name (volumes, mount scripts, logs)."""
        candidates = sorted(self.dir.glob(f"pods/{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise AssertionError(f"no pod directory for {namespace}/{pod} under {self.dir}/pods")
        return candidates[-1]

    def pod_logs(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        """The current (or previous) log of a pod's container, read from the node agent's log files."""
        logs = self.pod_dir(namespace, pod) / "logs"
        if container is None:
            names = sorted(p.name for p in logs.iterdir())
            if len(names) != 1:
                raise AssertionError(f"pod {namespace}/{pod} has containers {names}: name one")
            container = names[0]
        files = sorted((logs / container).glob("*.log"), key=lambda p: int(p.stem))
        wanted = files[-2] if previous else files[-1]
        return wanted.read_text(errors="replace")

    def agent_log(self, lines: int = 50) -> str:
        """The end of the node agent's log."""
        text = (self.local.logs_dir / "node-agent.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        """Close API clients."""
        for client in self._clients:
            client.close()
        self._clients.clear()


def start_cluster(directory: Path, owned: bool, **shape: Any) -> Cluster:
    """Start (or reuse) the cluster in ``directory``; fails the test session with log tails if it cannot.
    ``shape`` overrides the node shape (NodeShape fields, e.g. ``nodes=3, devices_per_node=2``)."""
    # Crash-loop back-off starts at 2 s (the kubelet's 10 s) so restart tests and operator tests stay short.
    config = ClusterConfig(die_with_parent=owned, restart_backoff_base=2.0, restart_backoff_max=20.0, **shape)
    local = LocalCluster(directory, config)
    try:
        local.up()
    except MissingToolError as exc:
        pytest.fail(f"the local cluster cannot start: {exc}", pytrace=False)
    except ClusterStartError as exc:
        pytest.fail(f"{exc}\n\nall component logs:\n{local.log_tails()}", pytrace=False)
    return Cluster(local, owned=owned)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's local Kubernetes cluster (see the module docstring)."""
    reuse = os.environ.get(REUSE_ENV)
    directory = Path(reuse) if reuse else tmp_path_factory.mktemp("cluster")
    handle = start_cluster(directory, owned=not reuse)
    try:
        yield handle
    finally:
        handle.close()
        if handle.owned:
            handle.local.down()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    """The PyptoServing CRD applied to the session's cluster and Established."""
    return cluster.install_crd()


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    prefix = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    name = cluster.create_namespace(prefix)
    try:
        yield name
    finally:
        cluster.delete_namespace(name)
