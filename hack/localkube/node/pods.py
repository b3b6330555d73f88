"""The life of one pod on a local node: address and devices, volumes, init containers, containers, status
writing, and graceful deletion (SIGTERM, grace period, SIGKILL, then the final delete)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hack.localkube.kubeclient import ApiError
from hack.localkube.node.allocation import AllocationError
from hack.localkube.node.containers import ContainerRunner, PodContext, rfc3339
from hack.localkube.node.status import compute_phase, pod_status
from hack.localkube.node.volumes import PodVolumes, VolumeError

if TYPE_CHECKING:
    from hack.localkube.node.agent import NodeAgent

DEVICES_ANNOTATION = "localkube.pypto.io/devices"
STATUS_INTERVAL = 1.0


def pod_key(pod: dict[str, Any]) -> str:
    """``namespace/name`` of a pod."""
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def requested_devices(container: dict[str, Any], resource: str) -> int:
    """How many devices of ``resource`` a container asks for (limits, else requests)."""
    resources = container.get("resources") or {}
    value = (resources.get("limits") or {}).get(resource) or (resources.get("requests") or {}).get(resource) or 0
    return int(value)


class PodWorker:
    """Runs one pod until it is deleted. All API writes for the pod's status go through here."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any]) -> None:
        self.agent = agent
        self.uid = pod["metadata"]["uid"]
        self.key = pod_key(pod)
        self.node = pod["spec"]["nodeName"]
        self._pod = pod
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop_grace: float | None = None
        self._stop = threading.Event()
        self._gone = False  # the API object no longer exists: nothing to finalize
        meta = pod["metadata"]
        self.dir = agent.config.dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid}"
        self.pod_ip = ""
        self.host_ip = agent.node_ips[self.node]
        self.start_time = (pod.get("status") or {}).get("startTime") or rfc3339(time.time())
        self.init_runners: list[ContainerRunner] = []
        self.runners: list[ContainerRunner] = []
        self.init_done = not pod["spec"].get("initContainers")
        self.devices: dict[str, list[int]] = {}
        self.reason: str | None = None
        self.message: str | None = None
        self.phase_override: str | None = None
        self._last_written: str | None = None
        self.volumes: PodVolumes | None = None
        self.volume_map: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.key}", daemon=True)

    # -------------------------------------------------------------------------------------------- events in
    def pod(self) -> dict[str, Any]:
        """The latest pod object seen."""
        with self._lock:
            return self._pod

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod from the watch (deletion starts the graceful stop)."""
        with self._lock:
            if _version(pod) >= _version(self._pod):
                self._pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.request_stop(float(pod["metadata"].get("deletionGracePeriodSeconds") or 0))
        self._changed.set()

    def removed(self) -> None:
        """The pod object is gone (force deletion): stop the containers quickly, write nothing more."""
        self._gone = True
        self.request_stop(2.0)

    def request_stop(self, grace: float) -> None:
        """Stop the pod within ``grace`` seconds."""
        with self._lock:
            self._stop_grace = grace if self._stop_grace is None else min(grace, self._stop_grace)
        self._stop.set()
        self._changed.set()

    def notify(self) -> None:
        """Something changed: write the status soon."""
        self._changed.set()

    # -------------------------------------------------------------------------------------------- lifecycle
    def _run(self) -> None:
        try:
            if self._setup():
                self._run_containers()
            if not self._stop.is_set():  # finished (Succeeded/Failed): keep the record until the pod is deleted
                self._release_resources()
                while not self._stop.is_set():
                    self._write_status_if_changed()  # writes only when it differs (or a write failed)
        except Exception:
            print(f"pod {self.key} worker error:\n{traceback.format_exc()}", flush=True)
        finally:
            self._teardown()

    def _setup(self) -> bool:
        """Address, devices, annotations and volumes; False if the pod was stopped or failed admission."""
        pod = self.pod()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pod_ip = self.host_ip if pod["spec"].get("hostNetwork") else self.agent.addresses.allocate(
            self.uid, (pod.get("status") or {}).get("podIP"))
        try:
            self._allocate_devices(pod)
        except AllocationError as exc:
            self.phase_override, self.reason = "Failed", "UnexpectedAdmissionError"
            self.message = f"Allocate failed due to {exc}, which is unexpected"
            self.agent.events.emit(pod, "UnexpectedAdmissionError", self.message, "Warning")
            self._write_status()
            return False
        self.volumes = PodVolumes(self.agent.client, pod, self.dir, self.pod_ip, self.host_ip,
                                  self.agent.config.node_cpu, self.agent.config.node_memory)
        self._write_status()
        while not self._stop.is_set():
            try:
                self.volume_map = self.volumes.prepare()
                return True
            except (VolumeError, ApiError) as exc:
                self.agent.events.emit(pod, "FailedMount", str(exc), "Warning")
                self.message = str(exc)
                self._write_status()
                self._stop.wait(2.0)
        return False

    def _allocate_devices(self, pod: dict[str, Any]) -> None:
        resource = self.agent.config.device_resource
        try:
            remembered = json.loads(pod["metadata"].get("annotations", {}).get(DEVICES_ANNOTATION) or "{}")
        except ValueError:
            remembered = {}
        pool = self.agent.devices[self.node]
        for container in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]:
            wanted = requested_devices(container, resource)
            if wanted:
                self.devices[container["name"]] = pool.allocate(self.uid, container["name"], wanted,
                                                                remembered.get(container["name"]))
        if not self.devices:
            return
        device_type = resource.split("/")[-1]
        app_devices = sorted({d for c in pod["spec"]["containers"] for d in self.devices.get(c["name"], [])})
        annotations = {DEVICES_ANNOTATION: json.dumps(self.devices, sort_keys=True),
                       "huawei.com/AscendReal": ",".join(f"{device_type}-{d}" for d in app_devices)}
        patched = self.agent.client.strategic_patch(
            f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}",
            {"metadata": {"uid": self.uid, "annotations": annotations}}, ok_missing=True)
        if patched:
            self.update(patched)

    def container_running(self, name: str) -> bool:
        """True while the named container's process runs."""
        return any(r.name == name and "running" in r.status()["state"] for r in self.init_runners + self.runners)

    def device_env(self, container: str) -> dict[str, str]:
        """ASCEND_RT_VISIBLE_DEVICES (and ASCEND_VISIBLE_DEVICES) for a container with devices."""
        ids = self.devices.get(container)
        if not ids:
            return {}
        visible = ",".join(str(d) for d in ids)
        return {"ASCEND_RT_VISIBLE_DEVICES": visible, "ASCEND_VISIBLE_DEVICES": visible}

    def _context(self) -> PodContext:
        config = self.agent.config
        assert self.volumes is not None
        return PodContext(get_pod=self.pod, pod_ip=self.pod_ip, host_ip=self.host_ip, pod_dir=self.dir,
                          volumes=self.volume_map, env_resolver=self.agent.env_resolver, device_env=self.device_env,
                          backoff_base=config.restart_backoff_base, backoff_max=config.restart_backoff_max,
                          events=self.agent.events, notify=self.notify, cluster_dir=config.dir,
                          image_paths=config.image_paths)

    def _previous_restarts(self, field: str) -> dict[str, int]:
        statuses = (self.pod().get("status") or {}).get(field) or []
        return {s["name"]: int(s.get("restartCount") or 0) for s in statuses}

    def _run_containers(self) -> None:
        pod = self.pod()
        ctx = self._context()
        policy = pod["spec"].get("restartPolicy") or "Always"
        previous = self._previous_restarts("initContainerStatuses")
        self.init_runners = [ContainerRunner(ctx, spec, init=True, restart_policy=policy,
                                             restart_count=previous.get(spec["name"], 0))
                             for spec in pod["spec"].get("initContainers") or []]
        previous = self._previous_restarts("containerStatuses")
        self.runners = [ContainerRunner(ctx, spec, init=False, restart_policy=policy,
                                        restart_count=previous.get(spec["name"], 0))
                        for spec in pod["spec"]["containers"]]
        for runner in self.init_runners:
            runner.start()
            while not runner.finished.is_set() and not self._stop.is_set():
                self._write_status_if_changed()
            if self._stop.is_set() or not runner.succeeded:
                return  # failed init container (restartPolicy Never) or deletion
        self.init_done = True
        for runner in self.init_runners:
            self.agent.devices[self.node].release(self.uid, runner.name)
        for runner in self.runners:
            runner.start()
        while not self._stop.is_set() and not all(runner.finished.is_set() for runner in self.runners):
            self._write_status_if_changed()

    def _write_status_if_changed(self) -> None:
        self._changed.wait(STATUS_INTERVAL)
        self._changed.clear()
        self._write_status()

    def _teardown(self) -> None:
        grace = self._stop_grace if self._stop_grace is not None else 0.0
        for runner in self.init_runners + self.runners:
            runner.request_stop(grace)
        for runner in self.init_runners + self.runners:
            runner.join(grace + 15)
        self._release_resources()
        if self.volumes is not None:
            self.volumes.cleanup()
        if not self._gone and self.agent.running:
            self._write_status()
            self._finalize()
        if not self.agent.running:
            return  # agent shutdown: keep pod dirs and logs for the next start
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        self.agent.worker_done(self)

    def _release_resources(self) -> None:
        self.agent.devices[self.node].release(self.uid)
        self.agent.addresses.release(self.uid)

    def _finalize(self) -> None:
        """Delete the pod object for good (grace period 0, only this uid), as the kubelet does."""
        pod = self.pod()
        if not pod["metadata"].get("deletionTimestamp"):
            return
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}
        try:
            self.agent.client.delete(f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/"
                                     f"{pod['metadata']['name']}", body)
        except ApiError as exc:
            if exc.status != 409:  # 409: a new pod with the same name already exists
                print(f"final delete of {self.key} failed: {exc}", flush=True)

    # -------------------------------------------------------------------------------------------- status out
    def _compose(self) -> dict[str, Any]:
        pod = self.pod()
        spec = pod["spec"]
        if self.init_runners:
            init_statuses = [runner.status() for runner in self.init_runners]
        else:
            init_statuses = [self._placeholder(c, "PodInitializing", "initContainerStatuses")
                             for c in spec.get("initContainers") or []]
        if self.runners and self.init_done:
            statuses = [runner.status() for runner in self.runners]
        else:
            reason = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
            statuses = [self._placeholder(c, reason, "containerStatuses") for c in spec["containers"]]
        policy = spec.get("restartPolicy") or "Always"
        phase = self.phase_override or compute_phase(policy, init_statuses, self.init_done, statuses)
        return pod_status(pod, pod_ip=self.pod_ip, host_ip=self.host_ip, start_time=self.start_time, phase=phase,
                          init_statuses=init_statuses, init_done=self.init_done, statuses=statuses,
                          reason=self.reason if self.phase_override else None,
                          message=self.message if self.phase_override else None)

    def _placeholder(self, container: dict[str, Any], reason: str, field: str) -> dict[str, Any]:
        previous = {s["name"]: s for s in (self.pod().get("status") or {}).get(field) or []}
        image = container.get("image", "")
        return {"name": container["name"], "image": image, "imageID": "", "state": {"waiting": {"reason": reason}},
                "lastState": previous.get(container["name"], {}).get("lastState") or {}, "ready": False,
                "restartCount": previous.get(container["name"], {}).get("restartCount", 0), "started": False}

    def _write_status(self) -> None:
        if self._gone:
            return
        status = self._compose()
        encoded = json.dumps(status, sort_keys=True)
        if encoded == self._last_written:
            return
        pod = self.pod()
        path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}/status"
        try:
            written = self.agent.client.strategic_patch(path, {"metadata": {"uid": self.uid}, "status": status},
                                                        ok_missing=True)
        except ApiError as exc:
            print(f"status update of {self.key} failed (will retry): {exc}", flush=True)
            return
        if written is None:
            self._gone = True
            return
        self._last_written = encoded
        with self._lock:
            if written["metadata"]["uid"] == self.uid and _version(written) >= _version(self._pod):
                self._pod = written


def _version(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def log_dir(pod_dir: Path, container: str) -> Path:
    """Where a container's log files are: ``<pod dir>/logs/<container>/<restart count>.log``."""
    return pod_dir / "logs" / container
