"""Operator benchmark on the real local cluster (hack/localkube), results in docs/benchmarks/operator.json.

Measures, with a real `pypto-serving operator` subprocess:

1. ``fleet``: 50 PyptoServings x 2 replicas applied at once -> every resource converged (both pods created and
   its status showing them) and every pod scheduled. The pods are pinned to a *virtual* node (a Node object no
   agent runs), so nothing starts: this isolates the operator and the control plane from 100 engine start-ups.
2. ``apply8``: one resource with 8 replicas (real engines, tiny model) -> all 8 pods created, and all Ready.
3. ``scale``: `kubectl scale` 8 -> 9 while requests flow through the gateway -> the new replica serves one.
4. The operator's CPU seconds and peak RSS during each phase, and its idle CPU afterwards.

Targets (issue): pods created within 1 s of apply for 8 replicas; 50 resources converged within 60 s;
operator RSS under 250 MB.

    .venv/bin/python benchmarks/operator_bench.py [--cluster-dir DIR] [--resources 50] [--replicas 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from hack.localkube import ClusterConfig, LocalCluster  # noqa: E402
from hack.localkube.tools import kubectl_binary  # noqa: E402
from pypto_serving.kube import Kube, load_config  # noqa: E402
from tests.operator.clusterkit import OperatorProcess, pod_ready  # noqa: E402
from tests.support.common import wait_for  # noqa: E402
from tests.support.models import tiny_model_dir  # noqa: E402

RESULTS = REPO_ROOT / "docs" / "benchmarks" / "operator.json"
VIRTUAL_NODE = "bench-virtual-node"
ENGINE_SELECTOR = "app.kubernetes.io/component=engine"


class ProcSampler:
    """Samples a process's RSS (peak) and CPU time from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Bench:
    """Cluster, namespace, operator and helpers for one benchmark run."""

    def __init__(self, cluster: LocalCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.kube = Kube(load_config(str(cluster.kubeconfig)))
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.namespace = f"bench-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        self.phases: dict[str, Any] = {}

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        import subprocess

        out = subprocess.run([str(kubectl_binary()), *args], env=self.env, input=stdin, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self.kube.list("v1", "Pod", self.namespace, labels=selector)

    def measure(self, name: str, sampler: ProcSampler) -> Any:
        bench = self

        class Phase:
            def __enter__(self) -> dict[str, Any]:
                self.cpu = sampler.cpu_seconds()
                self.started = time.monotonic()
                sampler.peak_rss_mb = sampler.rss_mb()
                self.result: dict[str, Any] = {}
                return self.result

            def __exit__(self, *exc: object) -> None:
                wall = time.monotonic() - self.started
                cpu = sampler.cpu_seconds() - self.cpu
                self.result.update(operator_cpu_seconds=round(cpu, 2), operator_cpu_percent=round(100 * cpu / wall, 1),
                                   operator_peak_rss_mb=round(sampler.peak_rss_mb, 1), wall_seconds=round(wall, 2))
                bench.phases[name] = self.result

        return Phase()


def engine_spec(model_dir: Path, replicas: int, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "replicas": replicas,
        "model": {"name": "tiny", "path": "/models/tiny", "mountPath": "/models/tiny",
                  "volume": {"hostPath": {"path": str(model_dir), "type": "Directory"}}},
        "parallel": {"tensorParallelSize": 1},
        "engine": {"dtype": "float32", "maxModelLen": 512, "maxNumSeqs": 8, "startupTimeoutSeconds": 600},
        "gateway": {"enabled": False},
        "drain": {"timeoutSeconds": 30},
    }
    spec.update(extra)
    return spec


def virtual_node(bench: Bench) -> list[dict[str, Any]]:
    """Register a tainted node with plenty of devices that no agent runs (pods bound to it never start); returns
    the tolerations that let pods onto it."""
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": VIRTUAL_NODE, "labels": {"kubernetes.io/hostname": VIRTUAL_NODE}},
            "spec": {"taints": [{"key": "pypto.bench/virtual", "value": "true", "effect": "NoSchedule"}]}}
    if bench.kube.get("v1", "Node", VIRTUAL_NODE) is None:
        bench.kube.create(node)
    capacity = {"huawei.com/Ascend910": "1000", "cpu": "1000", "memory": "1000Gi", "pods": "1000"}
    bench.kube.merge_patch("v1", "Node", VIRTUAL_NODE, {"status": {"capacity": capacity, "allocatable": capacity}},
                           status=True)
    return [{"operator": "Exists", "effect": "NoSchedule"}]


def fleet(bench: Bench, sampler: ProcSampler, model_dir: Path, count: int) -> None:
    """50 x 2 replicas on a virtual node: operator convergence without engine start-up."""
    tolerations = virtual_node(bench)
    docs = [{"apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing",
             "metadata": {"name": f"fleet-{i:02d}", "namespace": bench.namespace},
             "spec": engine_spec(model_dir, 2, engine={"nodeSelector": {"kubernetes.io/hostname": VIRTUAL_NODE},
                                                       "tolerations": tolerations})} for i in range(count)]
    names = {d["metadata"]["name"] for d in docs}
    with bench.measure("fleet", sampler) as out:
        started = time.monotonic()
        bench.kubectl("apply", "-f", "-", stdin="---\n".join(yaml.safe_dump(d) for d in docs))
        out["apply_seconds"] = round(time.monotonic() - started, 2)
        created_at = scheduled_at = None
        while True:
            pods = [p for p in bench.pods("app.kubernetes.io/component=engine")
                    if p["metadata"]["labels"]["app.kubernetes.io/instance"] in names]
            if created_at is None and len(pods) == 2 * count:
                created_at = time.monotonic()
            if scheduled_at is None and len(pods) == 2 * count and all(p["spec"].get("nodeName") for p in pods):
                scheduled_at = time.monotonic()
            listed = bench.kube.list("serving.pypto.io/v1alpha1", "PyptoServing", bench.namespace)
            converged = [r for r in listed if r["metadata"]["name"] in names
                         and (r.get("status") or {}).get("replicas") == 2
                         and len((r.get("status") or {}).get("replicaStatuses") or []) == 2
                         and r["status"].get("observedGeneration") == r["metadata"]["generation"]]
            if created_at and scheduled_at and len(converged) == count:
                break
            if time.monotonic() - started > 300:
                raise TimeoutError(f"fleet not converged: {len(converged)}/{count} resources, {len(pods)} pods")
            time.sleep(0.1)
        out.update(resources=count, replicas_each=2, all_pods_created_seconds=round(created_at - started, 2),
                   all_pods_scheduled_seconds=round(scheduled_at - started, 2),
                   converged_seconds=round(time.monotonic() - started, 2))
    idle_cpu = sampler.cpu_seconds()
    time.sleep(10)
    bench.phases["fleet"]["operator_idle_cpu_percent_after"] = round(10 * (sampler.cpu_seconds() - idle_cpu), 1)
    for name in sorted(names):
        bench.kubectl("delete", "pps", name, "-n", bench.namespace, "--wait=false")
    # nothing runs on the virtual node to confirm deletions: force them, then drop the node
    wait_for(lambda: not bench.kube.list("serving.pypto.io/v1alpha1", "PyptoServing", bench.namespace),
             60, "fleet resources deleted")
    bench.kubectl("delete", "pods", "-n", bench.namespace, "--all", "--grace-period=0", "--force")
    bench.kube.delete("v1", "Node", VIRTUAL_NODE)


def apply_and_scale(bench: Bench, sampler: ProcSampler, model_dir: Path, replicas: int) -> None:
    """8 real engines: apply -> created -> Ready; then kubectl scale +1 -> the new replica serves traffic."""
    body = {"apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing",
            "metadata": {"name": "bench", "namespace": bench.namespace},
            "spec": engine_spec(model_dir, replicas, gateway={"enabled": True, "routing": "least-requests"})}
    with bench.measure("apply8", sampler) as out:
        started = time.monotonic()
        bench.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))
        applied = time.monotonic()
        created = ready = None
        while ready is None:
            pods = bench.pods("app.kubernetes.io/instance=bench," + ENGINE_SELECTOR)
            if created is None and len(pods) == replicas:
                created = time.monotonic()
            if len(pods) == replicas and all(pod_ready(p) for p in pods):
                ready = time.monotonic()
            elif time.monotonic() - started > 900:
                raise TimeoutError("the engines did not become Ready")
            time.sleep(0.02 if created is None else 0.25)
        out.update(replicas=replicas, kubectl_apply_seconds=round(applied - started, 3),
                   all_pods_created_seconds=round(created - started, 3),
                   all_pods_ready_seconds=round(ready - started, 2))

    def gateway_ip() -> str | None:
        pods = bench.pods("app.kubernetes.io/instance=bench,app.kubernetes.io/component=gateway")
        return next((p["status"]["podIP"] for p in pods if pod_ready(p)), None)

    ip = wait_for(gateway_ip, 300, "a Ready gateway pod")
    served: dict[str, float] = {}
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not stop.is_set():
                try:
                    response = client.post(f"http://{ip}:8080/v1/completions",
                                           json={"model": "tiny", "prompt": "hi", "max_tokens": 8})
                    replica = response.headers.get("x-pypto-replica")
                    if response.status_code == 200 and replica and replica not in served:
                        served[replica] = time.monotonic()
                except httpx.HTTPError:
                    time.sleep(0.05)

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    wait_for(lambda: len(served) >= 1, 60, "traffic through the gateway")
    new_pod = f"bench-dp-{replicas}"
    with bench.measure("scale", sampler) as out:
        started = time.monotonic()
        bench.kubectl("scale", "pps", "bench", "-n", bench.namespace, f"--replicas={replicas + 1}")
        created = wait_for(lambda: bench.kube.get("v1", "Pod", new_pod, bench.namespace) and time.monotonic(), 60,
                           "the new pod")
        ready = wait_for(lambda: pod_ready(bench.kube.get("v1", "Pod", new_pod, bench.namespace) or {})
                         and time.monotonic(), 600, "the new pod Ready")
        wait_for(lambda: new_pod in served, 120, "the new replica to receive traffic")
        out.update(new_pod_created_seconds=round(created - started, 3), new_pod_ready_seconds=round(ready - started, 2),
                   first_request_served_seconds=round(served[new_pod] - started, 2),
                   ready_to_traffic_seconds=round(served[new_pod] - ready, 2))
    stop.set()
    for worker in workers:
        worker.join(30)
    bench.kubectl("delete", "pps", "bench", "-n", bench.namespace, "--wait=true", "--timeout=120s")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write docs/benchmarks/operator.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-dir", type=Path, default=None, help="reuse/start the cluster here (default: temp)")
    parser.add_argument("--resources", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    cluster_dir = args.cluster_dir or workdir / "cluster"
    cluster = LocalCluster(cluster_dir, ClusterConfig(nodes=2, devices_per_node=8))
    owned = not cluster.is_running()
    cluster.up()
    bench = Bench(cluster, workdir)
    model_dir = tiny_model_dir("qwen3")
    bench.kubectl("apply", "-f", str(REPO_ROOT / "crds" / "pyptoservings.serving.pypto.io.yaml"))
    bench.kubectl("create", "namespace", bench.namespace)
    operator = OperatorProcess(bench.namespace, bench.env, workdir / "operator.log").start()
    assert operator.proc is not None
    sampler = ProcSampler(operator.proc.pid)
    try:
        fleet(bench, sampler, model_dir, args.resources)
        apply_and_scale(bench, sampler, model_dir, args.replicas)
    finally:
        sampler.stop()
        operator.stop()
        bench.kubectl("delete", "namespace", bench.namespace, "--wait=false")
        if owned:
            cluster.down()
    result = {
        "benchmark": "operator",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "targets": {"apply8_all_pods_created_seconds": 1.0, "fleet_converged_seconds": 60.0,
                    "operator_peak_rss_mb": 250.0},
        "operator_peak_rss_mb": round(max(p["operator_peak_rss_mb"] for p in bench.phases.values()), 1),
        "phases": bench.phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
