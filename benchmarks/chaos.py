"""`make chaos`: the fault matrix under steady load, on the real local cluster, written to docs/reliability.md.

The system under test is what users run: the real control plane (hack/localkube), the operator as pods of the
helm chart (2 replicas, leader election, url-mode webhook), a PyptoServing with 4 real engines (tiny Qwen3) and
a gateway Deployment with 2 replicas requiring an API key. A fixed-rate open-loop client (benchmarks/loadgen.py,
no client retries) streams completions to both gateway pods by pod IP during every fault:

1. engine-kill      SIGKILL an engine process
2. pod-delete       delete an engine pod
3. operator-kill    SIGKILL the leading operator's process
4. apiserver        restart kube-apiserver (down for 5 s)
5. scale            scale 4 -> 1 -> 4
6. rollout          rolling update (a pod-shaping change)
7. gateway-kill     SIGKILL one of the two gateway processes

Each scenario measures a steady window before the fault, the fault until recovery, and a window after, and
judges its bounds (see each ``judge_*``). Results: docs/benchmarks/chaos.json and the tables of
docs/reliability.md (benchmarks/reliability_report.py).

    .venv/bin/python benchmarks/chaos.py [--scenarios engine-kill,scale] [--rate 4] [--phase-seconds 8]
                                         [--cluster-dir DIR (reuse a running cluster)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from benchmarks.chaos_system import (  # noqa: E402
    ChaosError,
    System,
    container_pid,
    deploy_serving,
    install_operator_chart,
    log,
    ready,
    restart_count,
    wait_restarted,
    wait_until,
)
from benchmarks.loadgen import LoadGenerator, Outcome, Window, summarize  # noqa: E402
from hack.localkube import ClusterConfig, LocalCluster  # noqa: E402
from pypto_serving.kube import ApiError  # noqa: E402

RESULTS = REPO_ROOT / "docs" / "benchmarks" / "chaos.json"
IN_FLIGHT_SLACK_S = 0.05  # a request that started this long after the fault was already on its way
NEW_REQUESTS_OK_WITHIN_S = 1.0

# ------------------------------------------------------------------------------------------- scenarios


@dataclass
class Check:
    """One judged bound."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class Scenario:
    """What happened in one scenario and how it was judged."""

    key: str
    title: str
    fault: str = ""
    fault_at: float = 0.0
    recovered_at: float | None = None
    windows: list[Window] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every bound held and nothing timed out."""
        return self.error is None and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = asdict(self)
        out["windows"] = [w.as_dict() for w in self.windows]
        out["passed"] = self.passed
        return out


class PodMonitor:
    """Samples the engine pods every 0.3 s: how many exist (not terminating) and which uids were ever seen."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.max_active = 0
        self.uids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-monitor", daemon=True)

    def start(self) -> PodMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.system.engine_pods()
                self.max_active = max(self.max_active,
                                      sum(1 for p in pods if not p["metadata"].get("deletionTimestamp")))
                self.uids.update(p["metadata"]["uid"] for p in pods)
            except Exception:  # the apiserver may be down (scenario 4)
                pass
            self._stop.wait(0.3)


@dataclass
class Ctx:
    """Shared by a scenario's inject / recover / judge steps."""

    system: System
    load: LoadGenerator
    monitor: PodMonitor
    fault_at: float = 0.0
    recovered_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    uids_before: set[str] = field(default_factory=set)
    extra_windows: list[Window] = field(default_factory=list)  # judges may add rows (e.g. per gateway)

    def since_fault(self) -> float:
        return round(time.time() - self.fault_at, 2)

    def wait_served_by(self, replica: str, after: float, timeout: float = 120) -> float:
        """Wait until a request that started after ``after`` succeeded on ``replica``; seconds since the fault."""
        wait_until(lambda: any(o.ok and o.replica == replica and o.start >= after for o in self.load.snapshot()),
                   timeout, f"a successful request served by {replica}")
        return self.since_fault()

    def wait_target_ok(self, target: str, after: float, timeout: float = 120) -> float:
        """Wait until a request sent to ``target`` after ``after`` succeeded; seconds since the fault."""
        wait_until(lambda: any(o.ok and o.target == target and o.start >= after for o in self.load.snapshot()),
                   timeout, f"a successful request through {target}")
        return self.since_fault()


def run_scenario(system: System, key: str, title: str, inject: Callable[[Ctx], str],
                 recover: Callable[[Ctx], None], judge: Callable[[Ctx], list[Check]], *, rate: float,
                 phase_s: float, max_tokens: int = 128, targets: Sequence[str] | None = None) -> Scenario:
    """Steady load; ``phase_s`` of baseline; the fault; wait for recovery; ``phase_s`` after; judge."""
    result = Scenario(key, title)
    targets = list(targets or system.gateway_targets())
    load = LoadGenerator(targets, model=system.model, rate=rate, max_tokens=max_tokens, api_key=system.api_key)
    ctx = Ctx(system, load, PodMonitor(system))
    ctx.uids_before = {p["metadata"]["uid"] for p in system.engine_pods()}
    log(f"--- {key}: {title} (load {rate:g} req/s over {len(targets)} gateway(s))")
    load.start()
    ctx.monitor.start()
    try:
        time.sleep(phase_s)  # the steady-state measurement window before the fault
        ctx.fault_at = time.time()
        result.fault = inject(ctx)
        log(f"{key}: fault injected: {result.fault}")
        try:
            recover(ctx)
            ctx.recovered_at = time.time()
            log(f"{key}: recovered after {ctx.recovered_at - ctx.fault_at:.1f}s {ctx.timings}")
        except ChaosError as exc:
            result.error = str(exc)
            ctx.recovered_at = time.time()
            log(f"{key}: NOT recovered: {exc}")
        time.sleep(phase_s)  # the measurement window after recovery
    finally:
        ctx.outcomes = load.stop()
        ctx.monitor.stop()
    end = max([o.start for o in ctx.outcomes] + [ctx.recovered_at]) + 1e-6
    result.fault_at, result.recovered_at = ctx.fault_at, ctx.recovered_at
    # before: finished before the fault; during: in flight at the fault or started before recovery; after: the rest.
    fault, recovered = ctx.fault_at, ctx.recovered_at
    result.windows = [
        summarize(ctx.outcomes, "before", load.started_at, fault, select=lambda o: o.end < fault),
        summarize(ctx.outcomes, "during", fault, recovered, select=lambda o: o.end >= fault and o.start < recovered),
        summarize(ctx.outcomes, "after", recovered, end, select=lambda o: o.start >= recovered)]
    result.checks = judge(ctx)
    result.windows += ctx.extra_windows
    result.timings, result.info = ctx.timings, ctx.info
    for w in result.windows:
        p99 = "-" if w.p99_s is None else f"{w.p99_s * 1000:.0f} ms"
        log(f"{key}: {w.name:>32}: sent {w.sent:4d}  succeeded {w.succeeded:4d}  failed {w.failed:3d}  p99 {p99}"
            + (f"  {w.errors}" if w.errors else ""))
    for check in result.checks:
        log(f"{key}: [{'ok' if check.passed else 'FAILED'}] {check.name} {check.detail}")
    return result


# --- checks shared by the scenarios --------------------------------------------------------------------------------


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


def check_zero_failures(ctx: Ctx) -> Check:
    bad = failures(ctx.outcomes)
    detail = f"{len(ctx.outcomes)} sent, {len(bad)} failed" + (f"; first: {bad[0].error}" if bad else "")
    return Check("zero failed requests", not bad, detail)


def check_only_in_flight(ctx: Ctx, replica: str) -> Check:
    """Every failed request was in flight on ``replica`` when the fault hit."""
    bad = [o for o in failures(ctx.outcomes)
           if not (o.start <= ctx.fault_at + IN_FLIGHT_SLACK_S and o.end >= ctx.fault_at and o.replica == replica)]
    n = len(failures(ctx.outcomes))
    sample = [(round(o.start - ctx.fault_at, 2), o.replica, o.error) for o in bad[:3]]
    detail = (f"{n} failed, all in flight on {replica}" if not bad
              else f"{len(bad)} failures were not in flight on {replica}: {sample}")
    return Check(f"only requests in flight on {replica} failed", not bad, detail)


def check_new_requests_ok(ctx: Ctx, within: float = NEW_REQUESTS_OK_WITHIN_S) -> Check:
    """Every request started ``within`` seconds after the fault or later succeeded."""
    later = [o for o in ctx.outcomes if o.start >= ctx.fault_at + within]
    bad = failures(later)
    last_fail = max((o.start - ctx.fault_at for o in failures(ctx.outcomes) if o.start >= ctx.fault_at), default=None)
    detail = (f"{len(later)} requests started >= {within:g}s after the fault, {len(bad)} failed"
              + (f"; last failure started {last_fail:.2f}s after the fault" if last_fail is not None else ""))
    return Check(f"new requests succeed within {within:g}s", not bad, detail)


# --- 1. engine SIGKILL ---------------------------------------------------------------------------------------------


def busy_engine(ctx: Ctx, timeout: float = 10.0) -> tuple[dict[str, Any], int]:
    """A Ready engine pod with requests in flight right now (its /load, polled by pod IP), so that the fault
    hits work in progress; the last Ready pod if none is busy within ``timeout``. Returns (pod, running)."""
    deadline = time.monotonic() + timeout
    pods = [p for p in ctx.system.engine_pods() if ready(p)]
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            for pod in pods:
                try:
                    running = client.get(f"http://{pod['status']['podIP']}:8000/load").json()["running"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                if running > 0:
                    return pod, int(running)
    return pods[-1], 0


def inject_engine_kill(ctx: Ctx) -> str:
    victim, running = busy_engine(ctx)
    name, pid = victim["metadata"]["name"], container_pid(victim)
    ctx.info.update(victim=name, restarts=restart_count(victim), in_flight=running)
    ctx.fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL pid {pid} (engine of pod {name}, {running} request(s) running there)"


def recover_engine_kill(ctx: Ctx) -> None:
    victim, before = ctx.info["victim"], ctx.info["restarts"]
    wait_restarted(ctx.system.engine_pods, victim, before, 300, f"{victim} restarted and Ready")
    ctx.timings["replica_restarted_ready_s"] = ctx.since_fault()
    ctx.timings["replica_serving_again_s"] = ctx.wait_served_by(victim, time.time())
    ctx.system.wait_converged(len(ctx.uids_before))


def judge_engine_kill(ctx: Ctx) -> list[Check]:
    victim = ctx.info["victim"]
    rejoined = any(o.ok and o.replica == victim and o.start >= ctx.fault_at + ctx.timings.get(
        "replica_restarted_ready_s", 1e9) for o in ctx.outcomes)
    return [check_only_in_flight(ctx, victim), check_new_requests_ok(ctx),
            Check("the replica was restarted and rejoined", rejoined,
                  f"Ready again {ctx.timings.get('replica_restarted_ready_s')}s, serving again "
                  f"{ctx.timings.get('replica_serving_again_s')}s after the kill")]


# --- 2. engine pod delete ------------------------------------------------------------------------------------------


def inject_pod_delete(ctx: Ctx) -> str:
    victim, running = busy_engine(ctx)
    ctx.info.update(victim=victim["metadata"]["name"], uid=victim["metadata"]["uid"], in_flight=running)
    ctx.fault_at = time.time()
    ctx.system.kubectl("delete", "pod", ctx.info["victim"], "-n", ctx.system.namespace, "--wait=false")
    return f"kubectl delete pod {ctx.info['victim']} ({running} request(s) running there)"


def recover_pod_delete(ctx: Ctx) -> None:
    n = len(ctx.uids_before)

    def replacement() -> dict[str, Any] | None:
        return next((p for p in ctx.system.engine_pods() if p["metadata"]["uid"] not in ctx.uids_before), None)

    wait_until(replacement, 60, "the operator to create a replacement pod")
    ctx.timings["replacement_created_s"] = ctx.since_fault()
    ctx.system.wait_converged(n)
    ctx.timings["converged_s"] = ctx.since_fault()
    new = replacement()
    assert new is not None
    ctx.info["replacement"] = new["metadata"]["name"]
    ctx.timings["replacement_serving_s"] = ctx.wait_served_by(new["metadata"]["name"], time.time())


def judge_pod_delete(ctx: Ctx) -> list[Check]:
    return [check_only_in_flight(ctx, ctx.info["victim"]), check_new_requests_ok(ctx),
            Check("the operator recreated the replica", "replacement" in ctx.info,
                  f"{ctx.info.get('replacement')} created {ctx.timings.get('replacement_created_s')}s, serving "
                  f"{ctx.timings.get('replacement_serving_s')}s after the delete")]


# --- 3. operator kill ----------------------------------------------------------------------------------------------


def inject_operator_kill(ctx: Ctx) -> str:
    lease = ctx.info["lease"]
    holder = wait_until(lambda: ctx.system.lease_holder(lease), 60, "the operator Lease holder")
    pod = next((p for p in ctx.system.operator_pods() if holder.startswith(p["metadata"]["name"] + "_")), None)
    if pod is None:
        raise ChaosError(f"no operator pod holds the Lease (holder {holder!r})")
    pid = container_pid(pod)
    ctx.info.update(victim=pod["metadata"]["name"], restarts=restart_count(pod), holder=holder)
    ctx.fault_at = time.time()
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL pid {pid} (the leading operator, pod {pod['metadata']['name']})"


def recover_operator_kill(ctx: Ctx) -> None:
    victim, before, old_holder = ctx.info["victim"], ctx.info["restarts"], ctx.info["holder"]
    wait_restarted(ctx.system.operator_pods, victim, before, 180, f"operator pod {victim} restarted and Ready")
    ctx.timings["operator_restarted_ready_s"] = ctx.since_fault()

    def new_leader() -> str | None:
        holder = ctx.system.lease_holder(ctx.info["lease"])
        return holder if holder and holder != old_holder else None
    ctx.info["new_holder"] = wait_until(new_leader, 120, "a live operator to hold the Lease")
    ctx.timings["new_leader_s"] = ctx.since_fault()
    # The new leader reconciles: prove it by a spec change (not pod-shaping) it must observe.
    generation = ctx.system.patch_spec({"drain": {"timeoutSeconds": 31}})
    wait_until(lambda: (ctx.system.resource().get("status") or {}).get("observedGeneration") == generation, 120,
               "the new leader to observe a spec change")
    ctx.timings["new_leader_reconciled_s"] = ctx.since_fault()
    ctx.system.wait_converged(len(ctx.uids_before))


def judge_operator_kill(ctx: Ctx) -> list[Check]:
    n = len(ctx.uids_before)
    extra = ctx.monitor.uids - ctx.uids_before
    return [check_zero_failures(ctx),
            Check("no duplicate pods", ctx.monitor.max_active <= n and not extra,
                  f"at most {ctx.monitor.max_active} engine pods (want {n}), {len(extra)} pods created"),
            Check("the operator was restarted and a leader reconciles", "new_leader_reconciled_s" in ctx.timings,
                  f"restarted+Ready {ctx.timings.get('operator_restarted_ready_s')}s, new Lease holder "
                  f"{ctx.info.get('new_holder')} after "
                  f"{ctx.timings.get('new_leader_s')}s, spec change observed "
                  f"{ctx.timings.get('new_leader_reconciled_s')}s after the kill")]


# --- 4. kube-apiserver restart -------------------------------------------------------------------------------------


def inject_apiserver_restart(ctx: Ctx) -> str:
    cluster = ctx.system.cluster
    if cluster is None:
        raise ChaosError("restarting the apiserver needs the LocalCluster handle")
    down_for = cluster.restart_component("kube-apiserver", downtime=ctx.info.get("downtime", 5.0))
    ctx.timings["apiserver_unavailable_s"] = round(down_for, 2)
    ctx.info["apiserver_back_at"] = time.time()
    return f"kube-apiserver stopped, down for {ctx.info.get('downtime', 5.0):g}s, restarted"


def recover_apiserver_restart(ctx: Ctx) -> None:
    generation = wait_until(lambda: ctx.system.patch_spec({"drain": {"timeoutSeconds": 32}}), 60,
                            "the apiserver to accept a spec change")
    wait_until(lambda: (ctx.system.resource().get("status") or {}).get("observedGeneration") == generation, 120,
               "the operator to observe a spec change after the restart")
    ctx.timings["operator_reconciled_after_restart_s"] = round(time.time() - ctx.info["apiserver_back_at"], 2)
    ctx.system.wait_converged(len(ctx.uids_before))


def judge_apiserver_restart(ctx: Ctx) -> list[Check]:
    back = ctx.info.get("apiserver_back_at", ctx.fault_at)
    down = [o for o in ctx.outcomes if ctx.fault_at <= o.start < back]
    served = {o.replica for o in down if o.ok}
    n = len(ctx.uids_before)
    return [check_zero_failures(ctx),
            Check("the gateways kept routing on their last view", len(down) > 0 and len(served) == n,
                  f"{len(down)} requests while the apiserver was down, served by {len(served)} of {n} replicas"),
            Check("the operator reconnected", "operator_reconciled_after_restart_s" in ctx.timings,
                  f"spec change observed {ctx.timings.get('operator_reconciled_after_restart_s')}s after the "
                  "apiserver came back")]


# --- 5. scale 4 -> 1 -> 4 ------------------------------------------------------------------------------------------


def inject_scale(ctx: Ctx) -> str:
    ctx.info["replicas"] = len(ctx.uids_before)
    ctx.system.kubectl("scale", "pps", ctx.system.name, "-n", ctx.system.namespace, "--replicas=1")
    return f"kubectl scale --replicas=1, converged, then --replicas={ctx.info['replicas']}"


def recover_scale(ctx: Ctx) -> None:
    ctx.system.wait_converged(1)
    ctx.timings["scaled_down_s"] = ctx.since_fault()
    up_at = time.time()
    ctx.system.kubectl("scale", "pps", ctx.system.name, "-n", ctx.system.namespace,
                       f"--replicas={ctx.info['replicas']}")
    ctx.system.wait_converged(ctx.info["replicas"])
    ctx.timings["scaled_up_ready_s"] = round(time.time() - up_at, 2)
    names = [p["metadata"]["name"] for p in ctx.system.engine_pods()]
    for name in names:
        ctx.wait_served_by(name, up_at)
    ctx.timings["all_serving_after_scale_up_s"] = round(time.time() - up_at, 2)


def judge_scale(ctx: Ctx) -> list[Check]:
    return [check_zero_failures(ctx),
            Check("converged both ways", "all_serving_after_scale_up_s" in ctx.timings,
                  f"4->1 converged {ctx.timings.get('scaled_down_s')}s; 1->4 Ready "
                  f"{ctx.timings.get('scaled_up_ready_s')}s, all serving "
                  f"{ctx.timings.get('all_serving_after_scale_up_s')}s")]


# --- 6. rolling update ---------------------------------------------------------------------------------------------


def inject_rollout(ctx: Ctx) -> str:
    stamp = str(int(time.time()))
    ctx.system.patch_spec({"engine": {"env": [{"name": "CHAOS_ROLLOUT", "value": stamp}]}})
    return "spec.engine.env changed (a new spec hash: every replica is replaced, maxUnavailable 1)"


def recover_rollout(ctx: Ctx) -> None:
    n = len(ctx.uids_before)

    def rolled() -> bool:
        status = ctx.system.resource().get("status") or {}
        pods = ctx.system.engine_pods()
        return (status.get("updatedReplicas") == n and len(pods) == n
                and all(p["metadata"]["uid"] not in ctx.uids_before for p in pods) and ctx.system.converged(n))

    wait_until(rolled, 900, "every replica replaced and Ready", interval=0.5)
    ctx.timings["rollout_s"] = ctx.since_fault()


def judge_rollout(ctx: Ctx) -> list[Check]:
    return [check_zero_failures(ctx),
            Check("every replica replaced", "rollout_s" in ctx.timings,
                  f"{len(ctx.uids_before)} replicas replaced in {ctx.timings.get('rollout_s')}s")]


# --- 7. gateway kill -----------------------------------------------------------------------------------------------


def inject_gateway_kill(ctx: Ctx) -> str:
    victim = ctx.system.gateway_pods()[0]
    ctx.info.update(victim=victim["metadata"]["name"], restarts=restart_count(victim),
                    target=f"http://{victim['status']['podIP']}:8080")
    pid = container_pid(victim)
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL pid {pid} (gateway pod {ctx.info['victim']})"


def recover_gateway_kill(ctx: Ctx) -> None:
    victim, before = ctx.info["victim"], ctx.info["restarts"]
    wait_restarted(ctx.system.gateway_pods, victim, before, 180, f"gateway {victim} restarted and Ready")
    ctx.timings["gateway_restarted_ready_s"] = ctx.since_fault()
    ctx.timings["gateway_serving_again_s"] = ctx.wait_target_ok(ctx.info["target"], time.time())
    ctx.system.wait_converged(len(ctx.uids_before))


def judge_gateway_kill(ctx: Ctx) -> list[Check]:
    target = ctx.info["target"]
    other = [o for o in ctx.outcomes if o.target != target]
    bad_other = failures(other)
    served_again = ctx.fault_at + ctx.timings.get("gateway_restarted_ready_s", 1e9)
    victim_after = [o for o in ctx.outcomes if o.target == target and o.start >= served_again]
    killed = [o for o in ctx.outcomes if o.target == target]
    ctx.extra_windows += [summarize(killed, "during, via the killed gateway", ctx.fault_at, ctx.recovered_at),
                          summarize(other, "during, via the other gateway", ctx.fault_at, ctx.recovered_at)]
    return [Check("requests to the other gateway unaffected", bool(other) and not bad_other,
                  f"{len(other)} sent to the other gateway, {len(bad_other)} failed"),
            Check("the killed gateway restarted and serves again",
                  bool(victim_after) and not failures(victim_after),
                  f"Ready {ctx.timings.get('gateway_restarted_ready_s')}s after the kill; {len(victim_after)} "
                  f"requests through it since, {len(failures(victim_after))} failed")]


SCENARIOS: dict[str, tuple[str, Callable[[Ctx], str], Callable[[Ctx], None], Callable[[Ctx], list[Check]]]] = {
    "engine-kill": ("SIGKILL an engine process", inject_engine_kill, recover_engine_kill, judge_engine_kill),
    "pod-delete": ("Delete an engine pod", inject_pod_delete, recover_pod_delete, judge_pod_delete),
    "operator-kill": ("Kill the leading operator pod's process", inject_operator_kill, recover_operator_kill,
                      judge_operator_kill),
    "apiserver": ("Restart kube-apiserver", inject_apiserver_restart, recover_apiserver_restart,
                  judge_apiserver_restart),
    "scale": ("Scale 4 -> 1 -> 4 under load", inject_scale, recover_scale, judge_scale),
    "rollout": ("Rolling update under load", inject_rollout, recover_rollout, judge_rollout),
    "gateway-kill": ("Kill one of two gateway replicas", inject_gateway_kill, recover_gateway_kill,
                     judge_gateway_kill),
}


def run_named(system: System, key: str, rate: float, phase_s: float, info: dict[str, Any] | None = None,
              max_tokens: int = 128) -> Scenario:
    """Run one scenario of ``SCENARIOS`` (``info`` seeds its context, e.g. the operator Lease name)."""
    title, inject, recover, judge = SCENARIOS[key]
    seeded = dict(info or {})

    def inject_seeded(ctx: Ctx) -> str:
        ctx.info.update(seeded)
        return inject(ctx)

    result = run_scenario(system, key, title, inject_seeded, recover, judge, rate=rate, phase_s=phase_s,
                          max_tokens=max_tokens)
    return result


# ------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "kernel": platform.release()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset, in this order")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second during every scenario")
    parser.add_argument("--phase-seconds", type=float, default=8.0, help="steady windows before and after a fault")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens streamed per request")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--cluster-dir", default=None, help="use (or start) the cluster in DIR and leave it running")
    parser.add_argument("--json-out", default=str(RESULTS))
    parser.add_argument("--no-report", action="store_true", help="do not regenerate docs/reliability.md")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")

    from tests.support.models import tiny_model_dir

    started = time.time()
    load_before = os.getloadavg()
    owned = args.cluster_dir is None
    directory = Path(args.cluster_dir or tempfile.mkdtemp(prefix="pypto-chaos-"))
    log(f"cluster in {directory}")
    cluster = LocalCluster(directory, ClusterConfig(die_with_parent=owned)).up()
    suffix = uuid.uuid4().hex[:5]
    system = System(cluster.kubeconfig, f"chaos-{suffix}", "chaos", api_key=f"chaos-key-{uuid.uuid4().hex}",
                    operator_namespace=f"pypto-system-{suffix}", cluster=cluster)
    results: list[Scenario] = []
    operator_security: dict[str, Any] = {}
    try:
        system.kubectl("create", "namespace", system.namespace)
        wait_until(lambda: (system.kube.get("v1", "ServiceAccount", "default", system.namespace) or {})
                   .get("secrets"), 60, "the namespace's default ServiceAccount token")
        log("installing the operator chart (2 replicas)")
        lease = install_operator_chart(system)
        pod = system.operator_pods()[0]
        operator_security = {"pod": pod["spec"].get("securityContext") or {},
                             "container": pod["spec"]["containers"][0].get("securityContext") or {}}
        deploy_serving(system, tiny_model_dir("qwen3"), args.replicas, gateway_replicas=2)
        for key in keys:
            info = {"lease": lease}
            try:
                result = run_named(system, key, args.rate, args.phase_seconds, info, args.max_tokens)
            except (ChaosError, ApiError, httpx.HTTPError) as exc:
                result = Scenario(key, SCENARIOS[key][0], error=f"{type(exc).__name__}: {exc}")
                log(f"{key}: aborted: {exc}")
                system.wait_converged(args.replicas)
            results.append(result)
    finally:
        if owned:
            log("stopping the cluster")
            cluster.down(purge=True)
    report = {
        "command": "make chaos  (= .venv/bin/python benchmarks/chaos.py " + " ".join(argv or sys.argv[1:]) + ")",
        "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1), "load_average_start": [round(x, 2) for x in load_before],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "rate_per_s": args.rate, "phase_seconds": args.phase_seconds, "max_tokens": args.max_tokens,
        "replicas": args.replicas, "gateways": 2,
        "operator_pod_security_context": operator_security,
        "scenarios": [r.as_dict() for r in results],
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json_out}")
    if not args.no_report:
        from benchmarks.reliability_report import write_report

        write_report()
    failed = [r.key for r in results if not r.passed]
    log(f"{len(results) - len(failed)}/{len(results)} scenarios within their bounds" +
        (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
