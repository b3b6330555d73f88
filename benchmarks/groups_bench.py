"""Serving-group benchmark on the real local cluster (3 nodes x 2 devices), results in docs/benchmarks/groups.json.

With a real `pypto-serving operator` subprocess:

1. ``apply``: one resource, one group of 2 pods (TP=2 on 1-device pods, real engines, tiny model): apply -> the
   leader created, the worker created (it needs the leader's IP), every pod Ready, the group Ready in the status.
2. ``heal``: delete the worker pod -> the whole group deleted, a new group Ready.
3. ``fleet``: 50 resources x 2 groups x 2 pods on a *virtual* node (a Node object no agent runs; this script plays
   its kubelet: it gives each pod an IP and marks it Running and Ready), so no engine starts: this isolates the
   operator and the control plane. Converged: every resource reports 2 Ready groups of 2 pods.
4. The operator's CPU seconds and peak RSS during each phase.

Targets (issue 19): the fleet converged within 60 s, operator RSS under 250 MB.

    .venv/bin/python benchmarks/groups_bench.py [--resources 50]
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
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from benchmarks.operator_bench import VIRTUAL_NODE, Bench, ProcSampler, engine_spec, virtual_node  # noqa: E402
from hack.localkube import ClusterConfig, LocalCluster  # noqa: E402
from tests.operator.clusterkit import OperatorProcess, pod_ready  # noqa: E402
from tests.support.common import wait_for  # noqa: E402
from tests.support.models import tiny_model_dir  # noqa: E402

RESULTS = REPO_ROOT / "docs" / "benchmarks" / "groups.json"
GROUP = {"parallel": {"tensorParallelSize": 2}, "devices": {"perNode": 1}}


def resource(bench: Bench, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing",
            "metadata": {"name": name, "namespace": bench.namespace}, "spec": spec}


def status(bench: Bench, name: str) -> dict[str, Any]:
    found = bench.kube.get("serving.pypto.io/v1alpha1", "PyptoServing", name, bench.namespace)
    return (found or {}).get("status") or {}


def groups_ready(st: dict[str, Any], groups: int, pods: int) -> bool:
    return (st.get("readyReplicas") == groups and len(st.get("groups") or []) == groups
            and all(g.get("ready") and len(g.get("pods") or []) == pods for g in st["groups"]))


def apply_and_heal(bench: Bench, sampler: ProcSampler, model_dir: Path) -> None:
    """A real 2-pod group: apply -> Ready; delete its worker -> a new group Ready."""
    spec = engine_spec(model_dir, 1, **GROUP)
    spec["engine"]["extraArgs"] = ["--cpu-threads", "1"]
    selector = "app.kubernetes.io/instance=grp,app.kubernetes.io/component=engine"
    with bench.measure("apply", sampler) as out:
        started = time.monotonic()
        bench.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(resource(bench, "grp", spec)))
        wait_for(lambda: len(bench.pods(selector)) >= 1, 60, "the leader", interval=0.02)
        out["leader_created_seconds"] = round(time.monotonic() - started, 2)
        wait_for(lambda: len(bench.pods(selector)) == 2, 120, "the worker", interval=0.02)
        out["worker_created_seconds"] = round(time.monotonic() - started, 2)
        wait_for(lambda: all(pod_ready(p) for p in bench.pods(selector)), 600, "both pods Ready", interval=0.1)
        out["pods_ready_seconds"] = round(time.monotonic() - started, 2)
        wait_for(lambda: groups_ready(status(bench, "grp"), 1, 2), 60, "the group Ready", interval=0.05)
        out["group_ready_seconds"] = round(time.monotonic() - started, 2)
    worker = next(p["metadata"]["name"] for p in bench.pods(selector) if p["metadata"]["name"].endswith("-1"))
    old = {p["metadata"]["uid"] for p in bench.pods(selector)}
    with bench.measure("heal", sampler) as out:
        started = time.monotonic()
        bench.kubectl("delete", "pod", worker, "-n", bench.namespace, "--wait=false")

        def new_group_ready() -> bool:
            pods = [p for p in bench.pods(selector) if not p["metadata"].get("deletionTimestamp")]
            return (len(pods) == 2 and not {p["metadata"]["uid"] for p in pods} & old
                    and groups_ready(status(bench, "grp"), 1, 2))

        wait_for(new_group_ready, 600, "a new group Ready", interval=0.1)
        out["group_ready_again_seconds"] = round(time.monotonic() - started, 2)
    bench.kubectl("delete", "pps", "grp", "-n", bench.namespace, "--wait=true", "--timeout=180s")


class VirtualKubelet:
    """Gives every pod bound to the virtual node an IP and marks it Running and Ready."""

    def __init__(self, bench: Bench) -> None:
        self.bench, self.stop, self.next_ip = bench, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        namespace = self.bench.namespace
        while not self.stop.is_set():
            for pod in self.bench.kube.list("v1", "Pod", namespace, fields={"spec.nodeName": VIRTUAL_NODE}):
                if (pod.get("status") or {}).get("podIP") or pod["metadata"].get("deletionTimestamp"):
                    continue
                self.next_ip += 1
                ip = f"127.251.{self.next_ip // 250}.{self.next_ip % 250 + 1}"
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                conditions = [{"type": kind, "status": "True", "lastTransitionTime": stamp}
                              for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
                self.bench.kube.merge_patch("v1", "Pod", pod["metadata"]["name"], {"status": {
                    "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.251.0.1",
                    "conditions": conditions}}, namespace, status=True)
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def fleet(bench: Bench, sampler: ProcSampler, model_dir: Path, count: int) -> None:
    """``count`` resources x 2 groups x 2 pods on the virtual node, converged."""
    tolerations = virtual_node(bench)
    docs = [resource(bench, f"fleet-{i:02d}", engine_spec(
        model_dir, 2, engine={"nodeSelector": {"kubernetes.io/hostname": VIRTUAL_NODE}, "tolerations": tolerations},
        **GROUP)) for i in range(count)]
    kubelet = VirtualKubelet(bench)
    try:
        with bench.measure("fleet", sampler) as out:
            started = time.monotonic()
            bench.kubectl("apply", "-f", "-", stdin="---\n".join(yaml.safe_dump(d) for d in docs))
            out["apply_seconds"] = round(time.monotonic() - started, 2)

            def converged() -> bool:
                listed = bench.kube.list("serving.pypto.io/v1alpha1", "PyptoServing", bench.namespace)
                return sum(groups_ready(r.get("status") or {}, 2, 2) for r in listed) == count

            wait_for(converged, 300, f"{count} resources x 2 ready groups of 2 pods", interval=0.2)
            pods = bench.pods("app.kubernetes.io/component=engine")
            out.update(resources=count, groups_each=2, pods_per_group=2, pods=len(pods),
                       converged_seconds=round(time.monotonic() - started, 2))
    finally:
        kubelet.close()
    for doc in docs:
        bench.kubectl("delete", "pps", doc["metadata"]["name"], "-n", bench.namespace, "--wait=false")
    wait_for(lambda: not bench.kube.list("serving.pypto.io/v1alpha1", "PyptoServing", bench.namespace), 60,
             "fleet resources deleted")
    bench.kubectl("delete", "pods", "-n", bench.namespace, "--all", "--grace-period=0", "--force")
    bench.kube.delete("v1", "Node", VIRTUAL_NODE)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write docs/benchmarks/groups.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="groups-bench-"))
    cluster = LocalCluster(workdir / "cluster", ClusterConfig(nodes=3, devices_per_node=2, die_with_parent=True))
    cluster.up()
    bench = Bench(cluster, workdir)
    bench.kubectl("apply", "-f", str(REPO_ROOT / "crds" / "pyptoservings.serving.pypto.io.yaml"))
    bench.kubectl("wait", "--for=condition=Established", "crd/pyptoservings.serving.pypto.io", "--timeout=60s")
    bench.kubectl("create", "namespace", bench.namespace)
    wait_for(lambda: (bench.kube.get("v1", "ServiceAccount", "default", bench.namespace) or {}).get("secrets"), 60,
             "the default ServiceAccount token")
    operator = OperatorProcess(bench.namespace, bench.env, workdir / "operator.log").start()
    assert operator.proc is not None
    sampler = ProcSampler(operator.proc.pid)
    model_dir = tiny_model_dir("qwen3")
    load_before = os.getloadavg()[0]
    try:
        apply_and_heal(bench, sampler, model_dir)
        fleet(bench, sampler, model_dir, args.resources)
    finally:
        sampler.stop()
        operator.stop()
        cluster.down()
    result = {
        "benchmark": "groups",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2)},
        "targets": {"fleet_converged_seconds": 60.0, "operator_peak_rss_mb": 250.0},
        "operator_peak_rss_mb": round(max(p["operator_peak_rss_mb"] for p in bench.phases.values()), 1),
        "phases": bench.phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
