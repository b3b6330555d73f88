"""Helpers of the operator's real-cluster tests: the operator as a subprocess, manifests, API polling."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from pypto_serving.kube import Kube
from pypto_serving.operator.security import DEFAULT_ALLOWED_HOST_PATHS
from pypto_serving.operator.types import API_VERSION, KIND
from tests.support.common import REPO_ROOT, free_port, wait_for
from tests.support.models import MODELS_DIR

OPERATOR_BIN = str(Path(sys.executable).parent / "pypto-serving")
# The built-in allow-list plus the cache's tiny models, which the tests mount by hostPath (the chart's
# security.allowedHostPaths does the same for the demo).
TEST_HOST_PATHS = ",".join((*DEFAULT_ALLOWED_HOST_PATHS, str(MODELS_DIR)))
# One control key for every operator a test run starts (as the chart's Secret is for every replica): a new leader
# derives the tokens the engines its predecessor created accept.
CONTROL_KEY = b"pypto-serving-test-control-key-0123456789"


def control_key_file(directory: Path) -> Path:
    """CONTROL_KEY in a file only its owner reads (the operator's --control-key-file)."""
    path = directory / "control.key"
    if not path.exists():
        path.write_bytes(CONTROL_KEY)
        path.chmod(0o600)
    return path


@dataclass
class OperatorProcess:
    """`pypto-serving operator` run as a subprocess against the test cluster (so tests can kill it)."""

    namespace: str
    env: dict[str, str]
    log_path: Path
    extra: list[str] = field(default_factory=list)
    health_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> OperatorProcess:
        """Start it; with ``wait``, return once /healthz answers."""
        self.health_port = free_port()
        command = [OPERATOR_BIN, "operator", "--namespace", self.namespace, "--health-host", "127.0.0.1",
                   "--health-port", str(self.health_port), "--resync-seconds", "10", "--lease-duration", "4",
                   "--lease-retry", "1", "--leader-election-id", "op-lease", "--allowed-host-paths", TEST_HOST_PATHS,
                   "--control-key-file", str(control_key_file(self.log_path.parent)), *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after this returns
        self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if wait:
            deadline = time.monotonic() + 60
            while not self._answers():
                if self.proc.poll() is not None:
                    raise AssertionError(f"the operator exited ({self.proc.returncode}):\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"operator /healthz on :{self.health_port} never answered:\n{self.log_tail()}")
                time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            return self.healthy()
        except httpx.HTTPError:
            return False

    def healthy(self) -> bool:
        """/healthz answers 200."""
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the operator exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")
        return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2, trust_env=False).status_code == 200

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        return httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5, trust_env=False).text

    def metric(self, name: str, labels: str = "") -> float:
        """One sample's value (0 when absent)."""
        for line in self.metrics().splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (lease not released, webhook left registered)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def resource(name: str, model: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A PyptoServing manifest serving ``model`` (small engine settings for the tiny model)."""
    body: dict[str, Any] = {
        "apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing", "metadata": {"name": name},
        "spec": {"replicas": 1, "model": model, "parallel": {"tensorParallelSize": 1},
                 "engine": {"dtype": "float32", "maxModelLen": 1024, "maxNumSeqs": 8, "startupTimeoutSeconds": 300},
                 "gateway": {"enabled": False}, "drain": {"timeoutSeconds": 60}},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body


def kubectl_apply(cluster: Any, namespace: str, body: dict[str, Any], check: bool = True,
                  dry_run: bool = False) -> Any:
    """`kubectl apply` a manifest into ``namespace`` (``dry_run``: server-side, through admission, nothing stored)."""
    extra = ["--dry-run=server"] if dry_run else []
    return cluster.kubectl("apply", *extra, "-n", namespace, "-f", "-", input=yaml.safe_dump(body), check=check)


def get_resource(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """The PyptoServing as stored."""
    found = kube.get(API_VERSION, KIND, name, namespace)
    assert found is not None
    return found


def engine_pods(kube: Kube, namespace: str, name: str, include_terminating: bool = True) -> list[dict[str, Any]]:
    """The engine pods of a resource, by rank."""
    pods = kube.list("v1", "Pod", namespace,
                     labels={"app.kubernetes.io/instance": name, "app.kubernetes.io/component": "engine"})
    if not include_terminating:
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return sorted(pods, key=lambda p: int(p["metadata"]["labels"]["serving.pypto.io/dp-rank"]))


def pod_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod.get("status", {}).get("conditions",
                                                                                                         []))


def wait_ready(kube: Kube, namespace: str, name: str, replicas: int, timeout: float = 240) -> dict[str, Any]:
    """Wait until the resource reports phase Ready with ``replicas`` ready replicas and its spec observed."""

    def ready() -> dict[str, Any] | None:
        body = get_resource(kube, namespace, name)
        status = body.get("status") or {}
        if (status.get("phase") == "Ready" and status.get("readyReplicas") == replicas
                and status.get("replicas") == replicas
                and status.get("observedGeneration") == body["metadata"]["generation"]):
            return body
        return None

    def describe() -> str:
        body = get_resource(kube, namespace, name)
        pods = [(p["metadata"]["name"], p.get("status", {}).get("phase"), pod_ready(p))
                for p in engine_pods(kube, namespace, name)]
        return f"status={body.get('status')}\npods={pods}"

    try:
        return wait_for(ready, timeout, f"{namespace}/{name} Ready with {replicas} replicas")  # type: ignore[return-value]
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe()}") from None


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """A status condition by type (empty dict when absent)."""
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == kind), {})


def events(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    """Kubernetes Events about the PyptoServing."""
    items = kube.list("v1", "Event", namespace)
    return [e for e in items if e.get("involvedObject", {}).get("kind") == "PyptoServing"
            and e["involvedObject"].get("name") == name]


def bind_operator_rbac(cluster: Any, namespace: str, account: str, lease: str = "op-lease",
                       webhook_config: str | None = None) -> list[tuple[str, str]]:
    """Give ServiceAccount ``namespace/account`` exactly operator/rbac.yaml: its watched-namespace ClusterRole
    through a RoleBinding in ``namespace``, its own-namespace Role (Lease ``lease``) there, and, with
    ``webhook_config``, the webhook ClusterRole for that configuration. Returns the cluster-scoped objects made
    (kind, name) for the caller to delete."""
    watched, own, hook = yaml.safe_load_all((REPO_ROOT / "operator" / "rbac.yaml").read_text())
    subject = [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    made: list[tuple[str, str]] = []
    watched["metadata"]["name"] = f"pypto-op-{namespace}"[:63]
    own["metadata"]["namespace"] = namespace
    for rule in own["rules"]:
        if rule.get("resourceNames") and "leases" in rule["resources"]:
            rule["resourceNames"] = [lease]
    objects: list[dict[str, Any]] = [watched, own, _binding("RoleBinding", watched, subject, namespace),
                                     _binding("RoleBinding", own, subject, namespace)]
    made.append(("clusterrole", watched["metadata"]["name"]))
    if webhook_config is not None:
        hook["metadata"]["name"] = f"pypto-op-hook-{namespace}"[:63]
        for rule in hook["rules"]:
            rule["resourceNames"] = [webhook_config]
        objects += [hook, _binding("ClusterRoleBinding", hook, subject)]
        made += [("clusterrole", hook["metadata"]["name"]), ("clusterrolebinding", hook["metadata"]["name"])]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    return made


def _binding(kind: str, role: dict[str, Any], subjects: list[dict[str, Any]],
             namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": role["metadata"]["name"]}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "subjects": subjects,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role["kind"],
                        "name": role["metadata"]["name"]}}
