"""One container as a host process: start (env, mounts, log file), probes, restarts with back-off, graceful stop.

Each container has its own supervising thread, which also starts the process: the process gets SIGKILL if that
thread ever dies (parent-death signal), so a crashed agent never leaves pod processes behind.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hack.localkube import processes
from hack.localkube.kubeclient import ApiError
from hack.localkube.node.env import ConfigError, EnvResolver, expand_command
from hack.localkube.node.events import EventRecorder
from hack.localkube.node.probes import Prober, ProbeTarget, run_action
from hack.localkube.node.volumes import Volume, VolumeError, container_command, container_mounts, write_mount_plan

TICK = 0.2
BACKOFF_RESET_AFTER = 600.0  # a container that ran this long starts its back-off over


def rfc3339(stamp: float) -> str:
    """A wall-clock timestamp in Kubernetes' format."""
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodContext:
    """What a container needs from its pod."""

    get_pod: Callable[[], dict[str, Any]]
    pod_ip: str
    host_ip: str
    pod_dir: Path
    volumes: dict[str, Volume]
    env_resolver: EnvResolver
    device_env: Callable[[str], dict[str, str]]
    backoff_base: float
    backoff_max: float
    events: EventRecorder
    notify: Callable[[], None]
    cluster_dir: Path
    image_paths: list[str]

    def grace_seconds(self) -> float:
        """The pod's termination grace period (deletion's if set)."""
        pod = self.get_pod()
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(grace)


class ContainerRunner:
    """Runs one container (app or init) until it is told to stop or its restart policy says it is done."""

    def __init__(self, ctx: PodContext, spec: dict[str, Any], *, init: bool, restart_policy: str,
                 restart_count: int = 0) -> None:
        self.ctx = ctx
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.restart_policy = restart_policy
        self.restart_count = restart_count
        self.field_path = f"spec.{'initContainers' if init else 'containers'}{{{self.name}}}"
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self._last_state: dict[str, Any] = {}
        self._ready = False
        self._started = False
        self._pid: int | None = None
        self._stop = threading.Event()
        self._stop_grace: float | None = None
        self.finished = threading.Event()  # set when the runner will not run the container again
        self.last_exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"container-{self.name}", daemon=True)

    # ------------------------------------------------------------------------------------------ public
    def start(self) -> None:
        """Start supervising."""
        self._thread.start()

    def request_stop(self, grace: float) -> None:
        """Stop the container: preStop, SIGTERM, SIGKILL after ``grace`` seconds; no restart afterwards."""
        with self._lock:
            self._stop_grace = grace if self._stop_grace is None else min(grace, self._stop_grace)
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the supervising thread."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def succeeded(self) -> bool:
        """True when the container finished for good with exit code 0."""
        return self.finished.is_set() and self.last_exit_code == 0

    @property
    def ready(self) -> bool:
        """The container's readiness."""
        with self._lock:
            return self._ready

    def status(self) -> dict[str, Any]:
        """The ContainerStatus the kubelet would report."""
        with self._lock:
            image = self.spec.get("image", "")
            status = {"name": self.name, "image": image, "imageID": f"localkube://{image}",
                      "state": dict(self._state), "lastState": dict(self._last_state), "ready": self._ready,
                      "restartCount": self.restart_count, "started": self._started}
            if self._pid is not None:
                status["containerID"] = f"localkube://{self._pid}"
            return status

    # ------------------------------------------------------------------------------------------ internals
    def _set(self, state: dict[str, Any] | None = None, *, ready: bool | None = None,
             started: bool | None = None) -> None:
        with self._lock:
            if state is not None:
                self._state = state
            if ready is not None:
                self._ready = ready
            if started is not None:
                self._started = started
        self.ctx.notify()

    def _event(self, reason: str, message: str, kind: str = "Normal") -> None:
        self.ctx.events.emit(self.ctx.get_pod(), reason, message, kind, self.field_path)

    def _run(self) -> None:
        delay: float | None = None
        try:
            while not self._stop.is_set():
                began = time.time()
                try:
                    exit_code = self._run_once()
                except Exception:  # an agent bug must not end the container for good: count it as a crash
                    print(f"container {self._pod_name()}/{self.name}: supervisor error (restarting it):\n"
                          f"{traceback.format_exc()}", flush=True)
                    exit_code = 128
                if exit_code is None:  # stopped before it could start
                    break
                self.last_exit_code = exit_code
                if self._stop.is_set() or not self._should_restart(exit_code):
                    break
                if time.time() - began > BACKOFF_RESET_AFTER:
                    delay = None
                delay = 0.0 if delay is None else min(max(delay * 2, self.ctx.backoff_base), self.ctx.backoff_max)
                if delay > 0:
                    message = f"back-off {delay:g}s restarting failed container={self.name} pod={self._pod_name()}"
                    self._set({"waiting": {"reason": "CrashLoopBackOff", "message": message}})
                    self._event("BackOff", "Back-off restarting failed container", "Warning")
                    if self._stop.wait(delay):
                        break
                with self._lock:
                    self.restart_count += 1
        except Exception:
            print(f"container {self._pod_name()}/{self.name} supervisor crashed:\n{traceback.format_exc()}", flush=True)
            self._set({"terminated": {"exitCode": 128, "reason": "Error", "message": "node agent error"}})
        finally:
            self.finished.set()
            self.ctx.notify()

    def _pod_name(self) -> str:
        meta = self.ctx.get_pod()["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    def _should_restart(self, exit_code: int) -> bool:
        if self.init:
            return exit_code != 0 and self.restart_policy != "Never"
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)

    def _prepare(self) -> tuple[list[str], dict[str, str], Path] | None:
        """Resolve env, command and mounts, retrying config errors every 2 s; None if stopped meanwhile."""
        while not self._stop.is_set():
            pod = self.ctx.get_pod()
            try:
                env = self.ctx.env_resolver.container_env(pod, self.spec, self.ctx.pod_ip, self.ctx.host_ip,
                                                          self.ctx.device_env(self.name))
                command = expand_command(self.spec, env)
                if not command:
                    raise ConfigError("container has no command or args: the localkube node agent ignores "
                                      "images and runs `command`+`args` as a host process")
                mounts = container_mounts(self.spec, self.ctx.volumes, env)
                plan = write_mount_plan(self.ctx.pod_dir / f"{self.name}.mounts.json", mounts,
                                        self.spec.get("workingDir") or "/", self.ctx.image_paths)
                return command, env, plan
            except (ConfigError, VolumeError, ApiError, httpx.HTTPError, OSError) as exc:
                if self.status()["state"].get("waiting", {}).get("message") != str(exc):
                    self._event("Failed", f"Error: {exc}", "Warning")
                self._set({"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}})
                self._stop.wait(2.0)
        return None

    def _log_path(self) -> Path:
        return self.ctx.pod_dir / "logs" / self.name / f"{self.restart_count}.log"

    def _spawn(self, command: list[str], env: dict[str, str], plan: Path) -> subprocess.Popen[bytes] | None:
        executable = command[0]
        found = executable if "/" in executable else shutil.which(executable, path=env.get("PATH"))
        if not found or not os.access(found, os.X_OK):
            message = f'exec: "{executable}": executable file not found in $PATH'
            now = rfc3339(time.time())
            self._record_exit(128, "StartError", now, now, message)
            self._event("Failed", f"Error: {message}", "Warning")
            return None
        env = {**env, processes.MARKER: str(self.ctx.cluster_dir)}
        args = processes.with_parent_death_signal(container_command(plan, command))
        log_path = self._log_path()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab", buffering=0) as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd="/", start_new_session=True, close_fds=True)

    def _record_exit(self, exit_code: int, reason: str, started: str, finished: str, message: str = "") -> None:
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": finished}
        if message:
            terminated["message"] = message
        if self._pid is not None:
            terminated["containerID"] = f"localkube://{self._pid}"
        with self._lock:
            self._last_state = {"terminated": terminated}
        self._set({"terminated": terminated}, ready=False)

    def _run_once(self) -> int | None:
        prepared = self._prepare()
        if prepared is None:
            return None
        command, env, plan = prepared
        proc = self._spawn(command, env, plan)
        if proc is None:
            return 128
        started_wall = time.time()
        with self._lock:
            self._pid = proc.pid
        self._set({"running": {"startedAt": rfc3339(started_wall)}}, ready=False, started=False)
        self._event("Started", f"Started container {self.name}")
        try:
            kill_reason = self._supervise(proc, env)
        finally:
            if proc.poll() is None:  # never leave a process behind unsupervised
                processes.signal_pids([proc.pid], signal.SIGKILL)
                proc.wait()
        code = proc.returncode
        exit_code = code if code is not None and code >= 0 else 128 + (-code if code else signal.SIGKILL)
        processes.signal_pids([proc.pid], signal.SIGKILL)  # leftovers in the container's process group
        reason = "Completed" if exit_code == 0 else "Error"
        self._record_exit(exit_code, reason, rfc3339(started_wall), rfc3339(time.time()), kill_reason)
        return exit_code

    def _supervise(self, proc: subprocess.Popen[bytes], env: dict[str, str]) -> str:
        """Watch the process and run probes until it exits; returns why it was killed ("" if it exited)."""
        ports = {p["name"]: int(p["containerPort"]) for p in self.spec.get("ports") or [] if p.get("name")}
        target = ProbeTarget(self.ctx.pod_ip, ports, env, proc.pid)
        started_at = time.monotonic()
        probers = {kind: Prober(kind, self.spec[f"{kind}Probe"], started_at)
                   for kind in ("startup", "readiness", "liveness") if self.spec.get(f"{kind}Probe")}
        if self.init:
            probers = {}
        started = "startup" not in probers
        if started:
            self._set(ready="readiness" not in probers, started=True)
        while True:
            if proc.poll() is not None:
                return ""
            if self._stop.is_set():
                self._graceful_stop(proc, target, self._stop_grace if self._stop_grace is not None else 30.0)
                return ""
            now = time.monotonic()
            startup = probers.get("startup")
            if not started and startup and startup.due(now):
                result = self._probe(startup, target, now)
                if result is True:
                    started = True
                    self._set(ready="readiness" not in probers, started=True)
                    if "readiness" in probers:
                        probers["readiness"].reset_due(now)
                elif result is False:
                    return self._kill_unhealthy(proc, target, startup)
            live = probers.get("liveness")
            if started and live and live.due(now) and self._probe(live, target, now) is False and proc.poll() is None:
                return self._kill_unhealthy(proc, target, live)
            ready = probers.get("readiness")
            if started and ready and ready.due(now):
                result = self._probe(ready, target, now)
                if result is not None and result != self.ready:
                    self._set(ready=result)
            self._stop.wait(TICK)  # wakes at once on a stop request; exits are seen by poll() within a tick

    def _probe(self, prober: Prober, target: ProbeTarget, now: float) -> bool | None:
        """Run a probe; a failed attempt is an ``Unhealthy`` event, as with the kubelet."""
        result = prober.run(target, now)
        if not prober.last_ok:
            self._event("Unhealthy", f"{prober.kind.capitalize()} probe failed: {prober.last_message}", "Warning")
        return result

    def _kill_unhealthy(self, proc: subprocess.Popen[bytes], target: ProbeTarget, prober: Prober) -> str:
        message = f"Container {self.name} failed {prober.kind} probe, will be restarted"
        self._event("Killing", message)
        self._set(ready=False)
        self._graceful_stop(proc, target, self.ctx.grace_seconds(), announce=False)
        return message

    def _graceful_stop(self, proc: subprocess.Popen[bytes], target: ProbeTarget, grace: float,
                       announce: bool = True) -> None:
        """preStop hook, SIGTERM to the process group, SIGKILL when ``grace`` runs out."""
        deadline = time.monotonic() + grace
        if announce:
            self._event("Killing", f"Stopping container {self.name}")
        pre_stop = (self.spec.get("lifecycle") or {}).get("preStop")
        if pre_stop and proc.poll() is None:
            ok, message = run_action(pre_stop, target, max(grace, 1.0))
            if not ok:
                self._event("FailedPreStopHook", message, "Warning")
        if proc.poll() is None:
            processes.signal_pids([proc.pid], signal.SIGTERM)
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                processes.signal_pids([proc.pid], signal.SIGKILL)
                proc.wait()
