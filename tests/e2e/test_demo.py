"""`make demo` end to end, then the chart's upgrade and uninstall, on a cluster of the demo's own.

The module runs the demo driver exactly as `make demo` does (python -m hack.demo up), with its own --dir and
--model-dir so it never touches a `make demo` cluster, and asserts every step's result from its JSON summary
and from the cluster itself. The tests after it reuse that cluster: a `helm upgrade` rolls the operator pods
and the new ones keep reconciling (a drained scale-down), a second release in webhook service mode serves
the chart's certificate, and `helm uninstall` removes the operator but leaves the served model running.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hack.localkube import LocalCluster
from hack.localkube.processes import marked_pids
from hack.localkube.tools import helm_binary, kubectl_binary
from tests.support.common import REPO_ROOT, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

RELEASE, OPERATOR_NS, NS = "pypto-serving", "pypto-system", "demo"
OPERATOR = f"{RELEASE}-operator"
CHART = REPO_ROOT / "helm" / "pypto-serving"
ENGINES = "app.kubernetes.io/instance=demo,app.kubernetes.io/component=engine"
OPERATOR_PODS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"


@dataclass
class DemoRun:
    """The demo's result and its (still running) cluster."""

    dir: Path
    model_dir: Path
    output: str
    returncode: int
    summary: dict[str, Any]
    seconds: float

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig of the demo cluster."""
        return self.dir / "kubeconfig"

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl against the demo cluster."""
        command = [str(kubectl_binary()), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {result.stdout}{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        """kubectl get ... -o json."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def helm(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """helm against the demo cluster."""
        command = [str(helm_binary()), "--kubeconfig", str(self.kubeconfig), *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
        return result

    def live_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods that are not terminating."""
        return [p for p in self.json("pods", "-n", namespace, "-l", selector)["items"]
                if not p["metadata"].get("deletionTimestamp")]

    def pod_log(self, namespace: str, pod: str) -> str:
        """The current log of a pod's only container (the node agent's log file)."""
        dirs = sorted(self.dir.glob(f"pods/{namespace}_{pod}_*/logs/*"))
        assert dirs, f"no log directory for {namespace}/{pod}"
        files = sorted(dirs[-1].glob("*.log"), key=lambda p: int(p.stem))
        return files[-1].read_text(errors="replace")


def ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition."""
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def run_demo(directory: Path, model_dir: Path, json_out: Path) -> tuple[int, str, float]:
    """python -m hack.demo up (what `make demo` runs); returns (exit code, output, seconds)."""
    import time

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hack.demo", "up", "--dir", str(directory), "--model-dir",
                           str(model_dir), "--json-out", str(json_out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1500, check=False)
    return proc.returncode, proc.stdout, time.monotonic() - start


@pytest.fixture(scope="module")
def demo_run() -> Iterator[DemoRun]:
    """The demo, run once for the module in a fresh directory; its cluster is stopped afterwards."""
    work = Path(tempfile.mkdtemp(prefix="pypto-demo-e2e-"))
    directory, model_dir, json_out = work / "cluster", work / "model" / "tiny-qwen3", work / "summary.json"
    try:
        code, output, seconds = run_demo(directory, model_dir, json_out)
        print(output)
        summary = json.loads(json_out.read_text()) if json_out.exists() else {}
        yield DemoRun(directory, model_dir, output, code, summary, seconds)
    finally:
        subprocess.run([sys.executable, "-m", "hack.demo", "down", "--dir", str(directory)], cwd=REPO_ROOT,
                       capture_output=True, timeout=300, check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_demo_serves_scales_and_reports_every_step(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    summary = demo_run.summary
    assert [s["step"] for s in summary["steps"]][-1] == "done" and len(summary["steps"]) == 9
    for number in range(1, 10):
        assert f"step {number}/9:" in demo_run.output
    assert summary["nodes"] == {"local-node-1": 8, "local-node-2": 8}
    assert (demo_run.model_dir / "model.safetensors").exists()
    # the operator runs as 2 pods of the helm release (one leader), and its webhook rejected a bad spec
    assert len(summary["operator"]["pods"]) == 2 and summary["operator"]["leader"]
    # the Lease holder names the leading pod ($POD_NAME_<suffix>), not the host every local pod shares
    assert summary["operator"]["leader"].rsplit("_", 1)[0] in summary["operator"]["pods"], summary["operator"]
    assert "spec.model.volume.hostPath" in summary["webhook_rejection"]
    # OpenAI requests through the gateway
    assert summary["completion"]["tokens"] == 12 and summary["completion"]["finish_reason"] == "length"
    assert summary["completion"]["text"]
    assert summary["chat"]["tokens"] >= 1
    stream = summary["stream"]
    assert stream["chunks"] >= 2 and 1 <= stream["tokens"] <= 16 and stream["finish_reason"] in ("length", "stop")
    # scaled to 3: the gateway routes to all three and the new one served traffic
    view = summary["replicas_after"]
    assert len(view) == 3 and all(r["state"] == "ready" for r in view), view
    assert summary["new_replica"] in {r["name"] for r in view}
    assert summary["served_by"][summary["new_replica"]] >= 1
    assert "make demo-down" in demo_run.output
    print(f"demo from an empty directory: {demo_run.seconds:.1f}s")


def test_the_cluster_agrees_with_the_demo(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    body = demo_run.json("pps", "demo", "-n", NS)
    assert body["status"]["phase"] == "Ready" and body["status"]["readyReplicas"] == 3
    engines = demo_run.live_pods(NS, ENGINES)
    assert len(engines) == 3 and all(ready(p) for p in engines)
    for pod in engines:
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "PyptoServing"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["huawei.com/Ascend910"] == "1"
    operators = demo_run.live_pods(OPERATOR_NS, OPERATOR_PODS)
    assert len(operators) == 2 and all(ready(p) for p in operators)
    assert {p["spec"]["serviceAccountName"] for p in operators} == {OPERATOR}  # in-cluster credentials
    # the gateway answers the test too, from one of the three replicas
    response = httpx.post(f"{demo_run.summary['gateway_url']}/v1/completions", trust_env=False, timeout=60,
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.headers["x-pypto-replica"] in {p["metadata"]["name"] for p in engines}


def test_rerunning_the_demo_reuses_everything(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    json_out = demo_run.dir.parent / "rerun.json"
    code, output, seconds = run_demo(demo_run.dir, demo_run.model_dir, json_out)
    assert code == 0, output
    assert "already running" in output and f"reusing {demo_run.model_dir}" in output
    summary = json.loads(json_out.read_text())
    assert summary["served_by"][summary["new_replica"]] >= 1
    print(f"demo rerun on the running cluster: {seconds:.1f}s")


def test_helm_upgrade_rolls_the_operator_and_it_keeps_reconciling(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    before = {p["metadata"]["name"] for p in demo_run.live_pods(OPERATOR_NS, OPERATOR_PODS)}
    demo_run.helm("upgrade", RELEASE, CHART, "-n", OPERATOR_NS, "--reuse-values", "--set", "operator.logLevel=DEBUG")

    def rolled() -> list[dict[str, Any]] | None:
        pods = demo_run.json("pods", "-n", OPERATOR_NS, "-l", OPERATOR_PODS)["items"]
        fresh = [p for p in pods if p["metadata"]["name"] not in before]
        return fresh if len(pods) == 2 and len(fresh) == 2 and all(ready(p) for p in fresh) else None

    fresh = wait_for(rolled, 240, "the upgraded operator pods to replace the old ones", interval=1)
    for pod in fresh:  # type: ignore[union-attr]
        assert "--log-level=DEBUG" in pod["spec"]["containers"][0]["args"]
    ips = {p["status"]["podIP"] for p in fresh}  # type: ignore[union-attr]

    def registered_by_new_pod() -> bool:
        hooks = demo_run.json("validatingwebhookconfiguration", OPERATOR).get("webhooks") or []
        return bool(hooks) and hooks[0]["clientConfig"]["url"].split("//")[1].split(":")[0] in ips

    wait_for(registered_by_new_pod, 60, "a new operator pod to register the webhook")
    # the new leader reconciles: a scale-down drains one replica and deletes it
    demo_run.kubectl("scale", "pps", "demo", "-n", NS, "--replicas=2")

    def scaled_down() -> bool:
        body = demo_run.json("pps", "demo", "-n", NS)
        st = body["status"]
        return (st.get("observedGeneration") == body["metadata"]["generation"] and st.get("readyReplicas") == 2
                and st.get("phase") == "Ready" and len(demo_run.json("pods", "-n", NS, "-l", ENGINES)["items"]) == 2)

    wait_for(scaled_down, 240, "the upgraded operator to drain and delete one replica", interval=1)
    reasons = {e["reason"] for e in demo_run.json("events", "-n", NS)["items"]
               if e["involvedObject"].get("kind") == "PyptoServing"}
    assert {"DrainingReplica", "DeletedReplica"} <= reasons, reasons


def test_service_mode_release_serves_the_charts_certificate(demo_run: DemoRun) -> None:
    """Webhook service mode (real clusters): the chart's CA is the caBundle and the operator serves its cert."""
    assert demo_run.returncode == 0, demo_run.output
    release, ns, watched = "svc", "svc-operator", "svc-watched"
    demo_run.kubectl("create", "namespace", watched)
    demo_run.helm("install", release, CHART, "-n", ns, "--create-namespace", "--set", "operator.replicas=1",
                  "--set", "operator.watch.allNamespaces=false", "--set", f"operator.watch.namespaces={{{watched}}}",
                  "--set", "webhook.failurePolicy=Ignore")  # the local apiserver cannot reach Services
    name, secret_name = f"{release}-pypto-serving-operator", f"{release}-pypto-serving-webhook-tls"
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"

    def serving_pod() -> dict[str, Any] | None:
        pods = demo_run.live_pods(ns, selector)
        if len(pods) == 1 and ready(pods[0]) and "serving the validating webhook" in demo_run.pod_log(
                ns, pods[0]["metadata"]["name"]):
            return pods[0]
        return None

    pod = wait_for(serving_pod, 240, "the service-mode operator to serve the chart's webhook", interval=1)
    secret = demo_run.json("secret", secret_name, "-n", ns)
    ca = base64.b64decode(secret["data"]["ca.crt"])
    hook = demo_run.json("validatingwebhookconfiguration", name)["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
    assert hook["clientConfig"]["service"] == {"name": f"{release}-pypto-serving-webhook", "namespace": ns,
                                               "port": 9443, "path": "/validate-pyptoserving"}
    # what the apiserver would verify: the pod's certificate chains to the caBundle for the Service's DNS name
    context = ssl.create_default_context(cadata=ca.decode())
    host = f"{release}-pypto-serving-webhook.{ns}.svc"
    with socket.create_connection((pod["status"]["podIP"], 9443), timeout=10) as raw,  \
            context.wrap_socket(raw, server_hostname=host) as tls:  # type: ignore[index]
        assert tls.version()
    # an upgrade keeps the certificate (lookup), so the caBundle stays valid
    demo_run.helm("upgrade", release, CHART, "-n", ns, "--reuse-values", "--set", "operator.logLevel=DEBUG")
    assert demo_run.json("secret", secret_name, "-n", ns)["data"]["ca.crt"] == secret["data"]["ca.crt"]
    demo_run.helm("uninstall", release, "-n", ns)
    for kind, obj in (("validatingwebhookconfiguration", name), ("secret", secret_name),
                      ("clusterrole", name), ("deployment", name)):
        args = (kind, obj) if kind.startswith(("validating", "cluster")) else (kind, obj, "-n", ns)
        assert demo_run.kubectl("get", *args, check=False).returncode != 0, f"{kind} {obj} left after uninstall"


def test_helm_uninstall_removes_the_operator_and_keeps_the_model_serving(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    demo_run.helm("uninstall", RELEASE, "-n", OPERATOR_NS)
    wait_for(lambda: not demo_run.json("pods", "-n", OPERATOR_NS, "-l", OPERATOR_PODS)["items"], 120,
             "the operator pods to go")
    for args in (("validatingwebhookconfiguration", OPERATOR), ("clusterrole", OPERATOR),
                 ("rolebinding", OPERATOR, "-n", NS), ("serviceaccount", OPERATOR, "-n", OPERATOR_NS)):
        assert demo_run.kubectl("get", *args, check=False).returncode != 0, f"{args} left after uninstall"
    # helm never deletes CRDs; the resource and its pods stay and keep serving
    demo_run.kubectl("get", "crd", "pyptoservings.serving.pypto.io")
    assert demo_run.json("pps", "demo", "-n", NS)["status"]["readyReplicas"] == 2
    response = httpx.post(f"{demo_run.summary['gateway_url']}/v1/chat/completions", trust_env=False, timeout=60,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "still there?"}],
                                "max_tokens": 4})
    assert response.status_code == 200, response.text
    # without the webhook configuration nothing blocks creating resources any more
    demo_run.kubectl("apply", "--dry-run=server", "-n", NS, "-f", str(REPO_ROOT / "examples" / "serving.yaml"))


def test_demo_down_stops_every_process(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output
    proc = subprocess.run([sys.executable, "-m", "hack.demo", "down", "--dir", str(demo_run.dir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stdout + proc.stderr
    assert not demo_run.dir.exists()
    leftovers = marked_pids(demo_run.dir.resolve())  # every process the cluster starts carries its marker
    assert not leftovers, f"processes of the demo cluster still running: {leftovers}"
    assert not LocalCluster(demo_run.dir).is_running()
