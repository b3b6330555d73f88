"""`pypto-serving engine --headless --node-rank R`: the ranks of one non-leader node of a replica spanning nodes.

A large replica (TP x PP ranks over ``--nnodes`` pods) has one leader (node 0: scheduler, OpenAI server, its own
ranks; llm_engine.py) and headless nodes. A headless node spawns its ranks (global ranks ``R * per_node ...``),
which join the leader's torch.distributed world at ``--master-addr:--master-port`` and then run every step that
rank 0 forwards to them (worker.py). It serves only ``/health`` (every rank alive), ``/ready`` (every rank loaded)
and an idle ``/load``, on ``--host:--port``, so Kubernetes probes and the operator see its state. It exits
non-zero as soon as one of its ranks fails: a distributed world cannot take a rank back, so the whole group is
restarted (the operator's job). It exits 0 when the leader stops the group, or on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection, wait
from typing import Any

from pypto_serving.contract import PATH_HEALTH, PATH_LOAD, PATH_READY, LoadReport
from pypto_serving.engine import device as devices
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.loader import load_hf_config
from pypto_serving.engine.worker import WORKER_START_TIMEOUT_S, WORKER_STOP_TIMEOUT_S, worker_main

log = logging.getLogger("pypto_serving.engine.node_worker")


class NodeRanks:
    """This node's rank processes: started, loaded (``ready``), alive, stopped."""

    def __init__(self, config: EngineConfig) -> None:
        from pypto_serving.engine.llm_engine import resolve_max_model_len

        self.config = config
        device_type = devices.resolve_device(config.device)
        if config.ranks_per_node > devices.device_count(device_type):
            raise ValueError(f"nnodes: {config.ranks_per_node} ranks on this node exceed the "
                             f"{devices.device_count(device_type)} visible {device_type} devices")
        max_model_len = resolve_max_model_len(load_hf_config(config.model), config.max_model_len)
        ctx = mp.get_context("spawn")
        self.ready = threading.Event()
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for rank in range(config.first_rank, config.first_rank + config.ranks_per_node):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"pypto-node{config.node_rank}-rank{rank}", daemon=True,
                               args=(config, device_type, max_model_len, rank, config.world_size,
                                     config.dist_init_method(), child))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def alive(self) -> bool:
        """Every rank process is running."""
        return all(p.is_alive() for p in self.procs)

    def wait_loaded(self) -> None:
        """Wait until every rank reported ready (RuntimeError if one fails or exits first)."""
        pending = set(range(len(self.conns)))
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while pending:
            ready = wait([self.conns[i] for i in pending] + [p.sentinel for p in self.procs],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError("the ranks did not join the leader's world in time")
            for obj in ready:
                if obj not in self.conns:
                    raise RuntimeError(f"a rank exited while starting: {self.exit_codes()}")
                index = self.conns.index(obj)
                kind, rank, payload = obj.recv()
                if kind != "ready":
                    raise RuntimeError(f"rank {rank} failed to start:\n{payload}")
                pending.discard(index)
        self.ready.set()

    def wait_exit(self) -> None:
        """Block until one rank process exits."""
        wait([p.sentinel for p in self.procs])

    def exit_codes(self) -> str:
        """Which ranks exited, with their codes."""
        return ", ".join(f"{p.name} ({p.exitcode})" for p in self.procs if not p.is_alive()) or "none"

    def stop(self) -> None:
        """Terminate the ranks (they hold no state worth keeping once the group ends)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()


def _handler(ranks: NodeRanks) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            alive = ranks.alive()
            body: dict[str, Any]
            if path == PATH_HEALTH:
                code, body = (200 if alive else 503), {"status": "ok" if alive else "unhealthy"}
            elif path == PATH_READY:
                ok = alive and ranks.ready.is_set()
                code, body = (200 if ok else 503), {"status": "ready" if ok else "loading" if alive else "unhealthy"}
            elif path == PATH_LOAD:
                code, body = 200, LoadReport().to_json()  # a headless node holds no requests
            else:
                code, body = 404, {"error": f"{path} is not served by a headless node"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return Handler


def main(config: EngineConfig, host: str, port: int) -> int:
    """Run this node's ranks until one exits (1) or SIGTERM/SIGINT (0)."""
    stopping = threading.Event()
    ranks = NodeRanks(config)
    server = ThreadingHTTPServer((host, port), _handler(ranks))
    threading.Thread(target=server.serve_forever, name="pypto-node-http", daemon=True).start()

    def on_signal(sig: int, _: Any) -> None:
        log.info("%s: stopping this node's ranks", signal.Signals(sig).name)
        stopping.set()
        ranks.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("node %d of %d: ranks %d..%d joining %s", config.node_rank, config.nnodes, config.first_rank,
             config.first_rank + config.ranks_per_node - 1, config.dist_init_method())
    try:
        ranks.wait_loaded()
        log.info("node %d: every rank loaded", config.node_rank)
        ranks.wait_exit()
    except RuntimeError as exc:
        if not stopping.is_set():
            log.error("%s", exc)
    finally:
        server.shutdown()
    if stopping.is_set():
        return 0
    time.sleep(1.0)  # the others follow a rank that was told to stop
    if all(p.exitcode == 0 for p in ranks.procs):
        log.info("the leader stopped the group")
        return 0
    log.error("a rank exited (%s): this node cannot serve any more", ranks.exit_codes())
    ranks.stop()
    return 1
