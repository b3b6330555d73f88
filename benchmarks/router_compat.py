"""The engine behind the routers people pick instead of ours: smg and vllm-router detect it as vLLM and their
load-aware policies use its load (issue 20, item 5).

Two tiny engines; one is kept busy by streams sent to it directly (not through the router), then 12 short
requests go through the router and the script counts where they land (each engine's
``vllm:e2e_request_latency_seconds_count``: the idle engine sees only router traffic). A policy that reads the
engines' load sends them all to the idle engine; one that only counts its own requests splits them (the routers
see no request of theirs in flight on either engine). Rows: smg ``power_of_two`` (it reads the vllm: gauges of
``/metrics`` once it takes a worker for vLLM), vllm-router ``power_of_two`` (``GET /get_load``) and, as the
control, vllm-router ``round_robin``. smg has no clean control: with ``--disable-load-monitoring`` its
``/get_loads`` still shows the engines' counts, and it also learns from its own requests' latency; so what its
load monitor read from each engine (its ``/get_loads``) is recorded instead, with what smg detected (runtime,
version, model path, max model len).

    python benchmarks/router_compat.py --peers-venv DIR   # a venv with `smg` and `vllm-router` from PyPI
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.gateway_common import PEERS_VENV, REPO_ROOT, PeerRouter, start_engines, write_result
from tests.support.common import wait_for
from tests.support.engines import EngineProcess
from tests.support.models import tiny_model_dir

PROBES = 12
BUSY_STREAMS = 6  # with --max-num-seqs 4: 4 running, 2 waiting on the busy engine
ENGINE_ARGS = ("--max-model-len", "1024", "--max-num-seqs", "4")


def served(engine: EngineProcess) -> float:
    """Requests the engine has finished (its e2e latency histogram's count)."""
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^vllm:e2e_request_latency_seconds_count\{[^}]*\} (\S+)$", text, re.M))


class Busy:
    """BUSY_STREAMS threads sending long completions to one engine until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model, self.stop = url, model, threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(BUSY_STREAMS)]

    def _loop(self) -> None:
        body = {"model": self.model, "prompt": "keep busy", "max_tokens": 900, "ignore_eos": True}
        while not self.stop.is_set():
            try:
                httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
            except httpx.HTTPError:
                time.sleep(0.1)

    def __enter__(self) -> Busy:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)


def run_row(name: str, command: list[str], engines: list[EngineProcess], model: str, log: Path,
            settle_s: float) -> dict:
    busy_engine, idle_engine = engines
    router = PeerRouter(command, log)
    url = router.url
    try:
        detected = None
        if "smg" in name:
            detected = httpx.get(f"{url}/workers", timeout=10).json()["workers"]
        with Busy(busy_engine.url, model):
            wait_for(lambda: httpx.get(f"{busy_engine.url}/load", timeout=5).json()["running"] >= 4, 60,
                     "the busy engine's batch full")
            time.sleep(settle_s)  # the routers' load monitors poll every second
            seen = None
            if "smg" in name:  # what smg's load monitor read from each engine (its /get_loads)
                seen = {entry["worker"]: {k: entry[k] for k in ("num_running_reqs", "num_waiting_reqs", "token_usage")}
                        for entry in httpx.get(f"{url}/get_loads", timeout=10).json()["loads"]}
            before = served(idle_engine)
            for i in range(PROBES):
                response = httpx.post(f"{url}/v1/completions", timeout=120,
                                      json={"model": model, "prompt": f"short {i}", "max_tokens": 1})
                response.raise_for_status()
            to_idle = round(served(idle_engine) - before)
        row = {"router": name, "to_idle": to_idle, "to_busy": PROBES - to_idle}
        if seen is not None:
            row["load_seen"] = {"busy": seen.get(busy_engine.url), "idle": seen.get(idle_engine.url)}
        if detected:
            row["detected"] = [{k: w.get(k) for k in ("url", "runtime_type", "labels")} for w in detected]
        return row
    finally:
        router.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV, help=f"venv with smg and vllm-router "
                   f"(default: $PYPTO_PEERS_VENV or {PEERS_VENV})")
    p.add_argument("--rounds", type=int, default=3, help="times each row is run")
    p.add_argument("--settle", type=float, default=3.0, help="seconds for the routers to poll the loaded engine")
    p.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks/router_compat.json")
    args = p.parse_args()
    smg, vllm_router = args.peers_venv / "bin" / "smg", args.peers_venv / "bin" / "vllm-router"
    if not (smg.exists() and vllm_router.exists()):
        print(f"no smg / vllm-router in {args.peers_venv}: `uv venv DIR && uv pip install --python DIR/bin/python "
              "smg vllm-router`", file=sys.stderr)
        return 2
    versions = {b.name: subprocess.run([str(args.peers_venv / "bin" / "python"), "-I", "-c",
                                        f"import importlib.metadata as m; print(m.version('{b.name}'))"],
                                       capture_output=True, text=True, check=False).stdout.strip()
                for b in (smg, vllm_router)}
    model_dir = tiny_model_dir("qwen3")
    work = Path(tempfile.mkdtemp(prefix="router-compat-"))
    engines = start_engines(model_dir, 2, ENGINE_ARGS, work)
    model = model_dir.name
    rows = []
    try:
        workers = [e.url for e in engines]
        for round_ in range(args.rounds):
            command = [str(smg), "launch", "--host", "127.0.0.1", "--port", "{port}", "--policy", "power_of_two",
                       "--load-monitor-interval", "1", "--prometheus-port", "{metrics_port}", "--worker-urls", *workers]
            rows.append({"round": round_, **run_row("smg power_of_two", command, engines, model,
                                                    work / f"smg-{len(rows)}.log", args.settle)})
            for name, policy in (("vllm-router power_of_two", "power_of_two"),
                                 ("vllm-router round_robin", "round_robin")):
                command = [str(vllm_router), "--host", "127.0.0.1", "--port", "{port}", "--policy", policy,
                           "--worker-startup-check-interval", "1", "--worker-urls", *workers]
                rows.append({"round": round_, **run_row(name, command, engines, model,
                                                        work / f"vllm-router-{len(rows)}.log", args.settle)})
    finally:
        for engine in engines:
            engine.stop()
    print(f"{'router and policy':36} to the idle engine, per round ({PROBES} requests each)")
    for name in dict.fromkeys(row["router"] for row in rows):
        print(f"{name:36} {' '.join(str(r['to_idle']) for r in rows if r['router'] == name)}")
    for row in rows:
        if row.get("load_seen"):
            print(f"{row['router']}: smg's /get_loads while one engine was busy: {row['load_seen']}")
    for worker in rows[0].get("detected") or []:
        print(f"smg detected {worker['url']}: runtime {worker['runtime_type']}, labels {worker['labels']}")
    if not args.no_record:
        write_result("router_compat", {"versions": versions, "probes": PROBES, "busy_streams": BUSY_STREAMS,
                                       "rows": rows, "script": str(Path(__file__).relative_to(REPO_ROOT))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
