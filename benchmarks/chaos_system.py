"""What `make chaos` and the system tests deploy and observe: the operator chart, a PyptoServing under test, and a
view of its pods (benchmarks/chaos.py runs the fault scenarios against it)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from hack.localkube import LocalCluster  # noqa: E402
from hack.localkube.tools import helm_binary, kubectl_binary  # noqa: E402
from pypto_serving.kube import Kube, load_config  # noqa: E402
from tests.support.common import wait_for  # noqa: E402
from tests.support.models import MODELS_DIR  # noqa: E402

CHART = REPO_ROOT / "helm" / "pypto-serving"
ENGINE_SELECTOR = "app.kubernetes.io/instance={name},app.kubernetes.io/component=engine"
GATEWAY_SELECTOR = "app.kubernetes.io/instance={name},app.kubernetes.io/component=gateway"
OPERATOR_SELECTOR = "app.kubernetes.io/name=pypto-serving,app.kubernetes.io/component=operator"


class ChaosError(AssertionError):
    """A scenario could not reach the state it waits for."""


def log(message: str) -> None:
    """Progress on stdout."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (errors while the thing restarts count as not yet);
    ChaosError after ``timeout`` seconds."""
    return wait_for(condition, timeout, what, interval, error=ChaosError)


def ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True and it is not terminating."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def container_pid(pod: dict[str, Any]) -> int:
    """Host pid of the pod's (first) container: the node agent reports it as ``localkube://<pid>``."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses or not statuses[0].get("containerID"):
        raise ChaosError(f"pod {pod['metadata']['name']} has no running container")
    return int(statuses[0]["containerID"].split("://", 1)[1])


def restart_count(pod: dict[str, Any]) -> int:
    """restartCount of the pod's (first) container."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return int(statuses[0].get("restartCount", 0)) if statuses else 0


def wait_restarted(pods: Callable[[], list[dict[str, Any]]], victim: str, restarts_before: int, timeout: float,
                   what: str) -> None:
    """Wait until pod ``victim`` (one of ``pods()``) restarted its container since ``restarts_before`` and is Ready."""

    def restarted() -> bool:
        pod = next((p for p in pods() if p["metadata"]["name"] == victim), None)
        return pod is not None and restart_count(pod) > restarts_before and ready(pod)

    wait_until(restarted, timeout, what)


def serving_manifest(name: str, model_dir: Path, replicas: int, gateway_replicas: int,
                     api_key_secret: str | None) -> dict[str, Any]:
    """The PyptoServing under test: tiny Qwen3 engines (CPU, one fake Ascend device each) behind the gateway."""
    gateway: dict[str, Any] = {"replicas": gateway_replicas, "routing": "least-pending-tokens"}
    if api_key_secret:
        gateway["apiKeySecret"] = {"name": api_key_secret, "key": "api-key"}
    return {
        "apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "model": {"name": "tiny", "path": "/models/tiny", "mountPath": "/models/tiny",
                      "volume": {"hostPath": {"path": str(model_dir), "type": "Directory"}}},
            "parallel": {"tensorParallelSize": 1},
            "engine": {"dtype": "float32", "maxModelLen": 1024, "maxNumSeqs": 16, "startupTimeoutSeconds": 600},
            "gateway": gateway,
            "drain": {"timeoutSeconds": 30},
        },
    }


@dataclass
class System:
    """The deployed system and the ways to look at it."""

    kubeconfig: Path
    namespace: str
    name: str
    api_key: str | None
    operator_namespace: str | None = None
    cluster: LocalCluster | None = None
    model: str = "tiny"
    kube: Kube = field(init=False)

    def __post_init__(self) -> None:
        self.kube = Kube(load_config(str(self.kubeconfig)), timeout=10)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the cluster."""
        command = [str(kubectl_binary()), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, capture_output=True, text=True, input=input, timeout=120, check=False)
        if check and result.returncode != 0:
            raise ChaosError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")
        return result

    # -- observation ----------------------------------------------------------------------------------------------
    def pods(self, selector: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Pods matching a label selector, by name."""
        items = self.kube.list("v1", "Pod", namespace or self.namespace, labels=selector)
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def engine_pods(self) -> list[dict[str, Any]]:
        """Engine pods, terminating ones included."""
        return self.pods(ENGINE_SELECTOR.format(name=self.name))

    def gateway_pods(self) -> list[dict[str, Any]]:
        """Gateway pods that are not terminating."""
        return [p for p in self.pods(GATEWAY_SELECTOR.format(name=self.name))
                if not p["metadata"].get("deletionTimestamp")]

    def operator_pods(self) -> list[dict[str, Any]]:
        """The operator's pods (helm chart)."""
        return self.pods(OPERATOR_SELECTOR, self.operator_namespace)

    def gateway_targets(self) -> list[str]:
        """Base URLs of the gateway pods (by pod IP: no kube-proxy here)."""
        return [f"http://{p['status']['podIP']}:8080" for p in self.gateway_pods() if p["status"].get("podIP")]

    def resource(self) -> dict[str, Any]:
        """The PyptoServing as stored."""
        found = self.kube.get("serving.pypto.io/v1alpha1", "PyptoServing", self.name, self.namespace)
        assert found is not None
        return found

    def patch_spec(self, spec: dict[str, Any]) -> int:
        """Merge-patch the spec; returns the new generation."""
        body = self.kube.merge_patch("serving.pypto.io/v1alpha1", "PyptoServing", self.name, {"spec": spec},
                                     self.namespace) or {}
        return int(body["metadata"]["generation"])

    def gateway_view(self, target: str) -> dict[str, str]:
        """A gateway's replicas and their states (GET /replicas, which needs the API key when there is one)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        data = httpx.get(f"{target}/replicas", headers=headers, timeout=3, trust_env=False).json()
        return {r["name"]: r["state"] for r in data["replicas"]}

    def converged(self, replicas: int) -> bool:
        """Ready with ``replicas`` replicas, nothing terminating, and every gateway routes to exactly them."""
        body = self.resource()
        status = body.get("status") or {}
        if not (status.get("phase") == "Ready" and status.get("readyReplicas") == replicas
                and status.get("replicas") == replicas
                and status.get("observedGeneration") == body["metadata"]["generation"]):
            return False
        pods = self.engine_pods()
        if len(pods) != replicas or not all(ready(p) for p in pods):
            return False
        names = {p["metadata"]["name"] for p in pods}
        gateways = self.gateway_pods()
        if not gateways or not all(ready(g) for g in gateways):
            return False
        for target in self.gateway_targets():
            view = self.gateway_view(target)
            if {n for n, state in view.items() if state == "ready"} != names:
                return False
        return True

    def wait_converged(self, replicas: int, timeout: float = 600) -> float:
        """Wait for ``converged(replicas)``; returns the seconds it took."""
        started = time.monotonic()
        wait_until(lambda: self.converged(replicas), timeout, f"{self.name} converged at {replicas} replicas",
                   interval=0.5)
        return time.monotonic() - started

    def lease_holder(self, lease: str) -> str | None:
        """holderIdentity of the operator's Lease: ``<pod>_<uuid8>`` for an operator pod (operator/leader.py)."""
        body = self.kube.get("coordination.k8s.io/v1", "Lease", lease, self.operator_namespace)
        return ((body or {}).get("spec") or {}).get("holderIdentity") or None


# ------------------------------------------------------------------------------------------- deployment


def install_operator_chart(system: System, release: str = "pypto-serving") -> str:
    """helm install the chart with the local cluster's values (url-mode webhook, 2 replicas) watching the
    system's namespace; returns the operator Lease name. Waits for both operator pods to be Ready."""
    assert system.operator_namespace
    command = [str(helm_binary()), "--kubeconfig", str(system.kubeconfig), "upgrade", "--install", release,
               str(CHART), "-n", system.operator_namespace, "--create-namespace",
               "-f", str(REPO_ROOT / "examples" / "local" / "values.yaml"),
               "--set", f"operator.watch.namespaces={{{system.namespace}}}", "--set", "operator.replicas=2",
               "--set", "operator.leaderElection.leaseDurationSeconds=10",
               # the tiny models are mounted from the cache by hostPath: the chart's allow-list must include it
               "--set", f"security.extraAllowedHostPaths={{{MODELS_DIR}}}", "--wait", "--timeout", "300s"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    if result.returncode != 0:
        raise ChaosError(f"helm install failed: {result.stdout}{result.stderr}")
    wait_until(lambda: len([p for p in system.operator_pods() if ready(p)]) == 2, 300, "2 Ready operator pods")
    return f"{release}-operator"


def deploy_serving(system: System, model_dir: Path, replicas: int, gateway_replicas: int) -> None:
    """Create the API-key Secret and the PyptoServing, and wait until it serves through every gateway."""
    if system.api_key:
        system.kubectl("create", "secret", "generic", "chaos-api-key", "-n", system.namespace,
                       f"--from-literal=api-key={system.api_key}")
    manifest = serving_manifest(system.name, model_dir, replicas, gateway_replicas,
                                "chaos-api-key" if system.api_key else None)
    system.kubectl("apply", "-n", system.namespace, "-f", "-", input=yaml.safe_dump(manifest))
    log(f"waiting for {replicas} engines and {gateway_replicas} gateways")
    took = system.wait_converged(replicas)
    wait_until(lambda: len(system.gateway_targets()) == gateway_replicas, 120, "gateway pod IPs")
    log(f"{system.name} serving through {gateway_replicas} gateways after {took:.1f}s")
