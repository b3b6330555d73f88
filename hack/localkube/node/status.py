"""Pod status as the kubelet writes it: phase, conditions, IPs and container statuses."""

from __future__ import annotations

from typing import Any

from hack.localkube.node.nodes import now_rfc3339

OWN_CONDITIONS = ("Initialized", "ContainersReady", "Ready")


def compute_phase(restart_policy: str, init_statuses: list[dict[str, Any]], init_done: bool,
                  statuses: list[dict[str, Any]]) -> str:
    """Pending, Running, Succeeded or Failed from the container statuses (the kubelet's getPhase, simplified)."""
    for status in init_statuses:
        terminated = status["state"].get("terminated")
        if restart_policy == "Never" and terminated and terminated["exitCode"] != 0:
            return "Failed"
    if not init_done:
        return "Pending"
    running = waiting_fresh = succeeded = failed = 0
    for status in statuses:
        state = status["state"]
        if "running" in state:
            running += 1
        elif "terminated" in state:
            if state["terminated"]["exitCode"] == 0:
                succeeded += 1
            else:
                failed += 1
        elif status["restartCount"] == 0 and not status.get("lastState"):
            waiting_fresh += 1
        else:
            running += 1  # waiting to restart (CrashLoopBackOff): the pod is still Running
    if waiting_fresh:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"  # everything exited and will be restarted
    if failed and restart_policy == "Never":
        return "Failed"
    if failed:
        return "Running"  # OnFailure: the failed ones restart
    return "Succeeded"


def _condition(previous: dict[str, dict[str, Any]], kind: str, ok: bool, reason: str = "",
               message: str = "") -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind)
    transition = old["lastTransitionTime"] if old and old.get("status") == status else now_rfc3339()
    condition = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": transition}
    if not ok and reason:
        condition["reason"] = reason
    if not ok and message:
        condition["message"] = message
    return condition


def pod_status(pod: dict[str, Any], *, pod_ip: str, host_ip: str, start_time: str, phase: str,
               init_statuses: list[dict[str, Any]], init_done: bool, statuses: list[dict[str, Any]],
               reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    """The full ``status`` to write for ``pod``; keeps the scheduler's and others' conditions."""
    old_status = pod.get("status") or {}
    previous = {c["type"]: c for c in old_status.get("conditions") or []}
    not_ready = [s["name"] for s in statuses if not s["ready"]]
    containers_ready = not not_ready and bool(statuses)
    gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
    gates_ok = all(previous.get(gate, {}).get("status") == "True" for gate in gates)
    terminal = phase in ("Succeeded", "Failed")
    not_ready_message = f"containers with unready status: [{' '.join(not_ready)}]"
    conditions = [
        _condition(previous, "Initialized", init_done, "ContainersNotInitialized",
                   "containers with incomplete status: [" + " ".join(
                       s["name"] for s in init_statuses if "terminated" not in s["state"]
                       or s["state"]["terminated"]["exitCode"] != 0) + "]"),
        _condition(previous, "ContainersReady", containers_ready and not terminal,
                   "PodCompleted" if terminal else "ContainersNotReady", "" if terminal else not_ready_message),
        _condition(previous, "Ready", containers_ready and gates_ok and not terminal,
                   "PodCompleted" if terminal else ("ContainersNotReady" if not containers_ready
                                                    else "ReadinessGatesNotReady"),
                   "" if terminal else (not_ready_message if not containers_ready else "readiness gates not ready")),
    ]
    conditions += [c for kind, c in previous.items() if kind not in OWN_CONDITIONS]
    status: dict[str, Any] = {
        "phase": phase, "conditions": conditions, "hostIP": host_ip, "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}] if pod_ip else [], "startTime": start_time,
        "containerStatuses": statuses,
    }
    if pod["spec"].get("initContainers"):
        status["initContainerStatuses"] = init_statuses
    if old_status.get("qosClass"):
        status["qosClass"] = old_status["qosClass"]
    status["reason"] = reason
    status["message"] = message
    return status
