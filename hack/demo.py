"""`make demo`: from nothing to a served, scaled model on the local Kubernetes cluster, one step at a time.

    python -m hack.demo up   [--dir .work/demo] [--model-dir DIR] [--json-out FILE]
    python -m hack.demo down [--dir .work/demo]

`up` starts (or reuses) a local cluster with 2 nodes x 8 huawei.com/Ascend910 devices, generates the tiny
model, installs the helm chart (the operator runs as pods, in-cluster, watching the demo namespace), applies
examples/local/serving.yaml, waits for it to be Ready, sends completion and chat requests (one streamed)
through the gateway with the `openai` client, scales to 3 replicas and shows the new replica taking traffic.
Every step prints a progress line; a failed step prints what failed, what to do next and exits 1. `down`
stops every process of the cluster and deletes its state. Nothing here is specific to the tests: the e2e
test (tests/e2e/test_demo.py) runs exactly this with its own --dir.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from hack.localkube import ClusterConfig, ClusterStartError, LocalCluster
from hack.localkube.tools import MissingToolError, helm_binary, k8s_binary, kubectl_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "pypto-serving"
EXAMPLE = REPO_ROOT / "examples" / "local" / "serving.yaml"
VALUES = REPO_ROOT / "examples" / "local" / "values.yaml"
DEFAULT_DIR = REPO_ROOT / ".work" / "demo"
DEFAULT_MODEL_DIR = Path("/tmp/pypto-serving/models/tiny-qwen3")  # the path examples/local/serving.yaml mounts
RELEASE, OPERATOR_NAMESPACE, NAMESPACE = "pypto-serving", "pypto-system", "demo"
GROUP, VERSION, PLURAL = "serving.pypto.io", "v1alpha1", "pyptoservings"
NODES, DEVICES = 2, 8
BIN = Path(sys.executable).parent


class StepError(RuntimeError):
    """A step failed: ``hint`` says what to do next."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class Demo:
    """State shared by the steps."""

    dir: Path
    model_dir: Path
    timeout: float
    started: float = field(default_factory=time.monotonic)
    cluster: LocalCluster | None = None
    api: Any = None
    gateway_url: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    # --- output ---------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """A progress line."""
        print(f"==> [demo +{time.monotonic() - self.started:5.1f}s] {message}", flush=True)

    def detail(self, message: str) -> None:
        """An indented detail line under the current step."""
        for line in message.splitlines():
            print(f"      {line}", flush=True)

    # --- running things -------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The cluster's admin kubeconfig."""
        return self.dir / "kubeconfig"

    def run(self, *command: str | Path, input: str | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a command with this cluster's KUBECONFIG; a failure with ``check`` is a StepError."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        args = [str(c) for c in command]
        try:
            result = subprocess.run(args, input=input, capture_output=True, text=True, env=env, timeout=timeout,
                                    check=False)
        except subprocess.TimeoutExpired as exc:
            raise StepError(f"`{' '.join(args)}` did not finish in {timeout:.0f}s", "rerun `make demo`") from exc
        if check and result.returncode != 0:
            raise StepError(f"`{' '.join(args)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}",
                            "read the error above; `make demo` can be rerun as is")
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """kubectl against the demo cluster."""
        return self.run(kubectl_binary(), *args, input=input, check=check)

    def helm(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """helm against the demo cluster."""
        return self.run(helm_binary(), *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float | None = None,
             progress: Callable[[], str] | None = None, hint: str = "", every: float = 10.0,
             interval: float = 0.5) -> Any:
        """Poll ``condition`` until truthy; print ``progress()`` every ``every`` s; StepError at the deadline."""
        timeout = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline, next_report, last_error = start + timeout, start + every, ""
        while True:
            try:
                result = condition()
                if result:
                    return result
            except Exception as exc:  # the thing may still be starting
                last_error = f"{type(exc).__name__}: {exc}"[:300]
            now = time.monotonic()
            if now >= deadline:
                state = progress() if progress else last_error
                raise StepError(f"timed out after {timeout:.0f}s waiting for {what} ({state})",
                                hint or "see the pod states above; `make demo` can be rerun as is")
            if progress and now >= next_report:
                self.detail(f"waiting for {what} ({now - start:.0f}s): {progress()}")
                next_report = now + every
            time.sleep(interval)

    # --- cluster reads --------------------------------------------------------------------------------------
    def core(self) -> Any:
        """CoreV1Api."""
        from kubernetes import client

        return client.CoreV1Api(self.api)

    def resource(self) -> dict[str, Any]:
        """The demo PyptoServing."""
        from kubernetes import client

        return client.CustomObjectsApi(self.api).get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL,
                                                                               NAMESPACE)

    def pods(self, namespace: str, selector: str) -> list[Any]:
        """Pods matching a label selector (terminating ones included)."""
        return list(self.core().list_namespaced_pod(namespace, label_selector=selector).items)

    def describe_pods(self, namespace: str, selector: str) -> str:
        """name=phase/ready for each pod."""
        parts = []
        for pod in sorted(self.pods(namespace, selector), key=lambda p: p.metadata.name):
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            state = "terminating" if pod.metadata.deletion_timestamp else pod.status.phase
            waiting = [s.state.waiting.reason for s in pod.status.container_statuses or [] if s.state.waiting]
            parts.append(f"{pod.metadata.name}={state}{'/ready' if ready else ''}"
                         f"{'/' + ','.join(w for w in waiting if w) if any(waiting) else ''}")
        return " ".join(parts) or "no pods yet"

    def replicas_view(self) -> list[dict[str, Any]]:
        """The gateway's GET /replicas."""
        return httpx.get(f"{self.gateway_url}/replicas", timeout=5, trust_env=False).json()["replicas"]


def active_engines(demo: Demo) -> set[str]:
    """Names of the engine pods that are neither terminating nor draining."""
    return {p.metadata.name for p in demo.pods(NAMESPACE, engine_selector()) if not p.metadata.deletion_timestamp
            and not (p.metadata.labels or {}).get("serving.pypto.io/draining")}


def engine_selector() -> str:
    """Label selector of the demo's engine pods."""
    return f"app.kubernetes.io/instance={NAMESPACE},app.kubernetes.io/component=engine"


def gateway_selector() -> str:
    """Label selector of the demo's gateway pods."""
    return f"app.kubernetes.io/instance={NAMESPACE},app.kubernetes.io/component=gateway"


# --- the steps ----------------------------------------------------------------------------------------------
def step_tools(demo: Demo) -> None:
    """Check that `make tools` ran: kube binaries, etcd, kubectl, helm."""
    try:
        for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            k8s_binary(name)
        helm, kubectl = helm_binary(), kubectl_binary()
    except MissingToolError as exc:
        raise StepError(str(exc), "run `make tools` (bash hack/install-tools.sh), then `make demo`") from exc
    if shutil.which("etcd") is None:
        raise StepError("etcd is not installed", "run `make tools`")
    demo.detail(f"helm {demo.run(helm, 'version', '--short').stdout.strip()}, kubectl {kubectl}")


def step_cluster(demo: Demo) -> None:
    """Start the local cluster in --dir, or find it running."""
    from kubernetes import config

    cluster = LocalCluster(demo.dir, ClusterConfig(nodes=NODES, devices_per_node=DEVICES))
    reused = cluster.is_running()
    try:
        cluster.up()
    except (ClusterStartError, MissingToolError) as exc:
        raise StepError(f"the local cluster did not start: {exc}",
                        f"read {demo.dir}/logs/; `make demo-down` then `make demo` starts over") from exc
    demo.cluster = cluster
    demo.api = config.new_client_from_config(config_file=str(demo.kubeconfig))
    nodes = demo.core().list_node().items
    capacity = ", ".join(f"{n.metadata.name}: {n.status.capacity.get('huawei.com/Ascend910', '0')} x "
                         "huawei.com/Ascend910" for n in nodes)
    demo.detail(f"{'reused the running' if reused else 'started a'} cluster at {cluster.server} ({capacity})")
    demo.summary["nodes"] = {n.metadata.name: int(n.status.capacity.get("huawei.com/Ascend910", 0)) for n in nodes}


def step_model(demo: Demo) -> None:
    """Generate the tiny Qwen3 model (random weights, real tokenizer) once."""
    from pypto_serving.engine.tiny_model import GENERATOR_VERSION

    target = demo.model_dir
    stamp = target / ".pypto-generator-version"
    if (target / "model.safetensors").exists() and stamp.exists() and stamp.read_text().strip() == str(
            GENERATOR_VERSION):
        demo.detail(f"reusing {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        demo.run(BIN / "pypto-serving", "tiny-model", tmp, "--arch", "qwen3", timeout=600)
        (tmp / stamp.name).write_text(f"{GENERATOR_VERSION}\n")  # a newer generator makes a new model
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep non-root engine users out
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    demo.detail(f"wrote {target} (`pypto-serving tiny-model {target} --arch qwen3`)")


def step_helm_install(demo: Demo) -> None:
    """helm install the chart; wait for the operator pods, the leader Lease and the webhook registration."""
    from kubernetes import client

    core = demo.core()
    if not any(ns.metadata.name == NAMESPACE for ns in core.list_namespace().items):
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    # the model directory (--model-dir) is mounted by hostPath: the chart's allow-list must include it
    allow = f"security.extraAllowedHostPaths={{{demo.model_dir}}}"
    demo.helm("upgrade", "--install", RELEASE, CHART, "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
              "--values", VALUES, "--set", allow)
    demo.detail(f"helm upgrade --install {RELEASE} helm/pypto-serving -n {OPERATOR_NAMESPACE} "
                f"--create-namespace -f {VALUES.relative_to(REPO_ROOT)} --set {allow}")
    apps, coordination = client.AppsV1Api(demo.api), client.CoordinationV1Api(demo.api)
    name = f"{RELEASE}-operator"
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"

    def rolled_out() -> bool:
        dep = apps.read_namespaced_deployment(name, OPERATOR_NAMESPACE)
        st, want = dep.status, dep.spec.replicas
        return bool(st.observed_generation == dep.metadata.generation and st.updated_replicas == want
                    and st.ready_replicas == want and (st.replicas or 0) == want)

    demo.wait(rolled_out, f"the operator Deployment {OPERATOR_NAMESPACE}/{name}",
              progress=lambda: demo.describe_pods(OPERATOR_NAMESPACE, selector),
              hint=f"kubectl -n {OPERATOR_NAMESPACE} logs -l app.kubernetes.io/component=operator")
    lease = demo.wait(lambda: coordination.read_namespaced_lease(name, OPERATOR_NAMESPACE).spec.holder_identity,
                      "the operator's leader Lease", timeout=120)
    admission = client.AdmissionregistrationV1Api(demo.api)

    def webhook_url() -> str | None:
        hooks = admission.read_validating_webhook_configuration(name).webhooks or []
        return hooks[0].client_config.url if hooks else None

    url = demo.wait(webhook_url, "the operator to register its validating webhook", timeout=120)
    pods = [p.metadata.name for p in demo.pods(OPERATOR_NAMESPACE, selector) if not p.metadata.deletion_timestamp]
    demo.detail(f"operator pods {', '.join(sorted(pods))}; leader {lease}; webhook {url}")
    demo.summary["operator"] = {"pods": sorted(pods), "leader": lease, "webhook_url": url}


def step_webhook(demo: Demo) -> None:
    """Show the admission webhook rejecting an invalid PyptoServing (server-side dry run): one that asks for the
    node's root filesystem, which the operator's host-path allow-list refuses."""
    bad = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyptoServing", "metadata": {"name": "invalid"},
           "spec": {"model": {"name": "x", "path": "/models/x", "volume": {"hostPath": {"path": "/"}}},
                    "parallel": {"tensorParallelSize": 1}}}
    result = demo.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(bad),
                          check=False)
    message = (result.stdout + result.stderr).strip()
    if result.returncode == 0 or "denied the request" not in message:
        raise StepError(f"an invalid PyptoServing was not rejected by the webhook: {message}",
                        f"kubectl -n {OPERATOR_NAMESPACE} logs -l app.kubernetes.io/component=operator")
    demo.detail(message.split("denied the request: ", 1)[-1])
    demo.summary["webhook_rejection"] = message


def rendered_example(model_dir: Path) -> str:
    """examples/local/serving.yaml with the model's hostPath pointing at ``model_dir``."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["spec"]["model"]["volume"]["hostPath"]["path"] = str(model_dir)
    return yaml.safe_dump(body, sort_keys=False)


def wait_serving(demo: Demo, replicas: int) -> dict[str, Any]:
    """Wait until the PyptoServing is Ready with ``replicas`` replicas and the gateway routes to all of them."""

    def ready() -> dict[str, Any] | None:
        body = demo.resource()
        st = body.get("status") or {}
        ok = (st.get("phase") == "Ready" and st.get("readyReplicas") == replicas and st.get("replicas") == replicas
              and st.get("observedGeneration") == body["metadata"]["generation"])
        return body if ok else None

    def progress() -> str:
        try:
            st = demo.resource().get("status") or {}
        except Exception as exc:
            return repr(exc)
        return (f"phase={st.get('phase')} ready={st.get('readyReplicas')}/{replicas} "
                f"pods: {demo.describe_pods(NAMESPACE, engine_selector())}")

    body = demo.wait(ready, f"PyptoServing {NAMESPACE}/{NAMESPACE} Ready with {replicas} replicas", progress=progress,
                     hint=f"kubectl describe pps -n {NAMESPACE} {NAMESPACE}; engine logs: kubectl logs -n {NAMESPACE} "
                          f"{NAMESPACE}-dp-0")

    def gateway_ip() -> str | None:
        for pod in demo.pods(NAMESPACE, gateway_selector()):
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if ready and not pod.metadata.deletion_timestamp and pod.status.pod_ip:
                return str(pod.status.pod_ip)
        return None

    ip = demo.wait(gateway_ip, "the gateway pod", progress=lambda: demo.describe_pods(NAMESPACE, gateway_selector()))
    demo.gateway_url = f"http://{ip}:8080"

    def routed() -> list[dict[str, Any]] | None:
        names = active_engines(demo)
        view = demo.replicas_view()
        ok = {r["name"] for r in view if r["state"] == "ready"} == names and len(names) == replicas
        return view if ok else None

    demo.wait(routed, f"the gateway to route to {replicas} ready replicas", timeout=120,
              progress=lambda: str([(r["name"], r["state"]) for r in demo.replicas_view()]))
    return body


def step_apply(demo: Demo) -> None:
    """kubectl apply the local example (2 replicas x TP 1 of the tiny model) and wait for Ready."""
    demo.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=rendered_example(demo.model_dir))
    demo.detail(f"kubectl apply -n {NAMESPACE} -f examples/local/serving.yaml  (model hostPath {demo.model_dir})")
    body = wait_serving(demo, 2)
    st = body["status"]
    for rs in st.get("replicaStatuses") or []:
        demo.detail(f"{rs['pod']}: rank {rs['rank']} on {rs.get('node')} devices {rs.get('devices')}")
    demo.detail(f"gateway {demo.gateway_url} (pod IP: the local cluster has no kube-proxy)")
    demo.summary.update(gateway_url=demo.gateway_url, ready_replicas=st["readyReplicas"],
                        replica_statuses=st.get("replicaStatuses"))


def openai_client(demo: Demo) -> Any:
    """An OpenAI client for the gateway (no proxies, no retries: every failure shows)."""
    import openai

    return openai.OpenAI(base_url=f"{demo.gateway_url}/v1", api_key="demo", max_retries=0, timeout=120,
                         http_client=httpx.Client(trust_env=False, timeout=120))


def step_requests(demo: Demo) -> None:
    """A completion, a chat completion and a streamed chat completion through the gateway."""
    client = openai_client(demo)
    raw = client.completions.with_raw_response.create(model="tiny", prompt="The capital of France is",
                                                      max_tokens=12, temperature=0)
    completion = raw.parse()
    demo.detail(f"completion via {raw.headers.get('x-pypto-replica')}: {completion.choices[0].text!r} "
                f"({completion.usage.completion_tokens} tokens, finish_reason {completion.choices[0].finish_reason})")
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello to Kubernetes."}], max_tokens=12)
    chat = raw.parse()
    demo.detail(f"chat via {raw.headers.get('x-pypto-replica')}: {chat.choices[0].message.content!r}")
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    if not pieces or usage is None:
        raise StepError("the streamed chat returned no chunks or no usage", "check the gateway and engine logs")
    demo.detail(f"streamed chat: {len(pieces)} chunks, {usage.completion_tokens} tokens: {''.join(pieces)!r}")
    demo.summary.update(
        completion={"text": completion.choices[0].text, "tokens": completion.usage.completion_tokens,
                    "finish_reason": completion.choices[0].finish_reason},
        chat={"text": chat.choices[0].message.content, "tokens": chat.usage.completion_tokens},
        stream={"chunks": len(pieces), "text": "".join(pieces), "tokens": usage.completion_tokens,
                "finish_reason": finish})


def step_scale(demo: Demo) -> None:
    """kubectl scale pps demo --replicas=3, then show the new replica taking traffic (x-pypto-replica, /replicas)."""
    before = active_engines(demo)
    demo.kubectl("scale", "pps", NAMESPACE, "-n", NAMESPACE, "--replicas=3")
    demo.detail(f"kubectl scale pps {NAMESPACE} -n {NAMESPACE} --replicas=3")
    wait_serving(demo, 3)
    after = active_engines(demo)
    new = sorted(after - before)
    if len(new) != 1:
        raise StepError(f"expected one new engine pod, found {new} (before {sorted(before)}, after {sorted(after)})",
                        f"kubectl get pods -n {NAMESPACE}")
    newcomer = new[0]
    client = openai_client(demo)

    def one(i: int) -> str:
        raw = client.completions.with_raw_response.create(model="tiny", prompt=f"Request {i}: once upon a time",
                                                          max_tokens=16)
        raw.parse()
        return str(raw.headers.get("x-pypto-replica"))

    served: Counter[str] = Counter()
    deadline = time.monotonic() + 120
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        while served[newcomer] == 0:
            if time.monotonic() > deadline:
                raise StepError(f"{newcomer} took no request within 120 s (served: {dict(served)})",
                                f"curl {demo.gateway_url}/replicas; kubectl logs -n {NAMESPACE} -l "
                                "app.kubernetes.io/component=gateway")
            served.update(pool.map(one, range(sum(served.values()), sum(served.values()) + 12)))
    view = demo.replicas_view()
    demo.detail(f"requests served per replica: {dict(sorted(served.items()))}; the new replica {newcomer} served "
                f"{served[newcomer]} of {sum(served.values())}")
    demo.detail(f"GET {demo.gateway_url}/replicas:")
    for r in view:
        load = r.get("load") or {}
        demo.detail(f"  {r['name']:<12} {r['state']:<9} {r['address']:<28} running={load.get('running')} "
                    f"pending_tokens={load.get('pending_tokens')}")
    demo.summary.update(new_replica=newcomer, served_by=dict(served), replicas_after=view)


def step_done(demo: Demo) -> None:
    """Print how to reach the gateway and how to stop."""
    url, kubeconfig = demo.gateway_url, demo.kubeconfig
    lines = [
        "PyptoServing is serving the tiny model with 3 replicas behind the gateway:",
        f"  export KUBECONFIG={kubeconfig}",
        f"  kubectl get pps -n {NAMESPACE}            # REPLICAS READY TP DEVICES/REPLICA PHASE",
        f"  curl {url}/v1/completions -H 'content-type: application/json' \\",
        "       -d '{\"model\": \"tiny\", \"prompt\": \"Hello\", \"max_tokens\": 16}'",
        f"  curl {url}/replicas                      # where the gateway routes, with each replica's load",
        f"  kubectl scale pps {NAMESPACE} -n {NAMESPACE} --replicas=1   # drains replicas before deleting them",
        f"  kubectl -n {OPERATOR_NAMESPACE} logs -l app.kubernetes.io/component=operator",
        "Stop everything (cluster, operator, engines, gateway): make demo-down",
    ]
    demo.detail("\n".join(lines))


STEPS: list[tuple[str, Callable[[Demo], None]]] = [
    ("check the tools (make tools)", step_tools),
    (f"local cluster: {NODES} nodes x {DEVICES} huawei.com/Ascend910", step_cluster),
    ("tiny model", step_model),
    ("helm install the chart (operator pods, RBAC, webhook)", step_helm_install),
    ("the webhook rejects an invalid PyptoServing", step_webhook),
    ("kubectl apply -f examples/local/serving.yaml, wait for Ready", step_apply),
    ("completion, chat and streamed chat through the gateway (openai client)", step_requests),
    ("kubectl scale pps demo --replicas=3: the new replica takes traffic", step_scale),
    ("done", step_done),
]


def diagnostics(demo: Demo) -> str:
    """Pods and recent warnings, for a failure message."""
    if not demo.kubeconfig.exists():
        return ""
    pods = demo.kubectl("get", "pods", "-A", "-o", "wide", check=False)
    events = demo.kubectl("get", "events", "-A", "--field-selector", "type=Warning", check=False)
    return f"pods:\n{pods.stdout}{pods.stderr}\nwarning events:\n{events.stdout[-3000:]}{events.stderr}"


def up(args: argparse.Namespace) -> int:
    """Run every step; exit 1 with what to do next when one fails."""
    demo = Demo(dir=args.dir.resolve(), model_dir=args.model_dir.resolve(), timeout=args.timeout)
    timings: list[dict[str, Any]] = []
    demo.summary["steps"] = timings
    code = 0
    for number, (title, step) in enumerate(STEPS, 1):
        demo.log(f"step {number}/{len(STEPS)}: {title}")
        start = time.monotonic()
        try:
            step(demo)
        except Exception as exc:
            hint = exc.hint if isinstance(exc, StepError) else "this is a bug in hack/demo.py or the part it names"
            print(f"\ndemo: FAILED at step {number}/{len(STEPS)} ({title}):\n  {exc}", file=sys.stderr)
            with contextlib.suppress(Exception):
                print(diagnostics(demo), file=sys.stderr)
            print(f"demo: next: {hint}\n      logs: {demo.dir}/logs/ and {demo.dir}/pods/*/logs/; "
                  "stop everything: make demo-down", file=sys.stderr)
            demo.summary.update(failed_step=title, error=str(exc))
            code = 1
            break
        timings.append({"step": title, "seconds": round(time.monotonic() - start, 2)})
    demo.summary["total_seconds"] = round(time.monotonic() - demo.started, 1)
    if code == 0:
        demo.log(f"demo complete in {demo.summary['total_seconds']:.0f}s")
    if args.json_out:
        args.json_out.write_text(json.dumps(demo.summary, indent=2, default=str))
    return code


def down(args: argparse.Namespace) -> int:
    """Stop the demo cluster and every process it started; delete its state."""
    directory = args.dir.resolve()
    if not directory.exists():
        print(f"==> nothing to stop: {directory} does not exist")
        return 0
    stopped = LocalCluster(directory).down(purge=True)
    print(f"==> stopped {stopped} processes of the demo cluster and deleted {directory}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m hack.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_up = sub.add_parser("up", help="run the demo (default)")
    p_up.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the demo cluster's directory")
    p_up.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="where the tiny model is generated")
    p_up.add_argument("--timeout", type=float, default=600.0, help="seconds each wait may take")
    p_up.add_argument("--json-out", type=Path, default=None, help="write a summary of every step's result here")
    p_down = sub.add_parser("down", help="stop the demo cluster and delete its state")
    p_down.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:] or ["up"])
    try:
        return up(args) if args.command == "up" else down(args)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; whatever started keeps running: `make demo-down` stops it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
