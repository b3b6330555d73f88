"""The node agent: registers the local nodes, watches the pods the scheduler binds to them and runs each with
a PodWorker; on SIGTERM it stops every pod process before exiting."""

from __future__ import annotations

import signal
import threading
import time
import traceback
from typing import Any
from urllib.parse import urlparse

from hack.localkube.kubeclient import ApiError, KubeClient, list_and_watch
from hack.localkube.node.allocation import AddressPool, DevicePool, claim_subnet
from hack.localkube.node.config import AgentConfig
from hack.localkube.node.env import EnvResolver
from hack.localkube.node.events import EventRecorder
from hack.localkube.node.kubelet_api import KubeletServer
from hack.localkube.node.nodes import NodeManager
from hack.localkube.node.pods import PodWorker

SHUTDOWN_GRACE = 5.0  # seconds a pod gets when the agent itself stops (the pods stay in the API)


def log(message: str) -> None:
    """A timestamped line in the agent log."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class NodeAgent:
    """Runs the cluster's local nodes in this process."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.client = KubeClient(config.credentials)
        octet, self._subnet_lock = claim_subnet(config.dir)
        self.addresses = AddressPool(octet)
        self.node_ips = {name: self.addresses.node_ip(index) for index, name in enumerate(config.node_names, 1)}
        self.devices = {name: DevicePool(config.devices_per_node) for name in config.node_names}
        apiserver_port = urlparse(config.server).port or 443
        self.env_resolver = EnvResolver(self.client, config.env_prefixes, config.path_prefix, apiserver_port,
                                        config.node_cpu, config.node_memory)
        self.events = EventRecorder(self.client)
        self.nodes = NodeManager(self.client, config, self.node_ips)
        self.workers: dict[str, PodWorker] = {}
        self._workers_lock = threading.Lock()
        self.stop = threading.Event()
        self.running = True
        self.kubelet_servers: list[KubeletServer] = []

    def run(self) -> None:
        """Register nodes, serve, and block until SIGTERM/SIGINT; then stop every pod."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        log(f"node agent starting: nodes {self.node_ips}, pod addresses 127.{self.addresses.octet}.x.y, "
            f"{self.config.devices_per_node} x {self.config.device_resource} per node")
        self.nodes.register()
        for name, address in self.node_ips.items():
            self.kubelet_servers.append(KubeletServer(self, name, address))
        threading.Thread(target=self.nodes.heartbeat_loop, args=(self.stop,), name="heartbeats", daemon=True).start()
        threading.Thread(target=self._watch_pods, name="pod-watch", daemon=True).start()
        log("nodes registered and Ready; watching pods")
        self.stop.wait()
        self.shutdown()

    def _watch_pods(self) -> None:
        while not self.stop.is_set():  # the watch must never die: without it no pod would run
            try:
                for kind, obj in list_and_watch(self.client, "/api/v1/pods", self.stop,
                                                fieldSelector="spec.nodeName!="):
                    try:
                        self._handle(kind, obj)
                    except Exception:
                        log(f"error handling pod event {kind}:\n{traceback.format_exc()}")
            except Exception:
                log(f"pod watch failed, restarting it in 1s:\n{traceback.format_exc()}")
                self.stop.wait(1.0)

    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "RELISTED":
            with self._workers_lock:
                vanished = [w for uid, w in self.workers.items() if uid not in pod["uids"]]
            for worker in vanished:
                worker.removed()
            return
        if pod["spec"].get("nodeName") not in self.node_ips:
            return
        uid = pod["metadata"]["uid"]
        with self._workers_lock:
            worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker:
                worker.removed()
            return
        if worker:
            worker.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
            if pod["metadata"].get("deletionTimestamp"):
                self._finalize_unmanaged(pod)
            return
        worker = PodWorker(self, pod)
        with self._workers_lock:
            self.workers[uid] = worker
        log(f"starting pod {worker.key} on {worker.node}")
        worker.thread.start()

    def _finalize_unmanaged(self, pod: dict[str, Any]) -> None:
        """Delete a terminating pod that has no processes here (finished, or from before an agent restart)."""
        meta = pod["metadata"]
        try:
            self.client.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                               {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                "preconditions": {"uid": meta["uid"]}})
        except ApiError as exc:
            log(f"final delete of {meta['namespace']}/{meta['name']} failed: {exc}")

    def worker_done(self, worker: PodWorker) -> None:
        """Forget a pod whose worker has finished."""
        with self._workers_lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
        log(f"pod {worker.key} finished")

    def find_worker(self, namespace: str, name: str) -> PodWorker | None:
        """The worker of a pod by namespace/name (the newest if several)."""
        with self._workers_lock:
            matches = [w for w in self.workers.values() if w.key == f"{namespace}/{name}"]
        return matches[-1] if matches else None

    def shutdown(self) -> None:
        """Stop every pod's processes (SIGTERM, then SIGKILL after a short grace) and the servers."""
        log("node agent stopping: terminating pod processes")
        self.running = False
        with self._workers_lock:
            workers = list(self.workers.values())
        for worker in workers:
            grace = float(worker.pod()["spec"].get("terminationGracePeriodSeconds", 30))
            worker.request_stop(min(grace, SHUTDOWN_GRACE))
        for worker in workers:
            worker.thread.join(SHUTDOWN_GRACE + 10)
        for server in self.kubelet_servers:
            server.close()
        self.client.close()
        log("node agent stopped")
