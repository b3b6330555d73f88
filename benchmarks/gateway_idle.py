"""Idle cost of the load signal: the gateway's and the engines' CPU per second with nothing to serve, for 4, 16 and
64 replicas, with pushed load (`GET /load?watch=1`, the default) and with polling (`--no-load-watch`, 50 ms).

The replicas are fake engines, all in one process (this script with ``--fake-engines``): one uvicorn server per
replica on its own port, each answering `/load` the way the engine does (the engine's own `LoadFeed` for the
stream, the same JSON document for a poll), so the engine-side number is what N engines would spend together.
Each configuration is measured for ``--seconds`` after every replica has a reading; CPU from /proc.
Run: `.venv/bin/python benchmarks/gateway_idle.py [--replicas 4,16,64] [--seconds 30]`; writes
docs/benchmarks/gateway_idle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gateway_common import cpu_seconds, gateway, write_result


def serve_fake_engines(count: int) -> None:
    """``count`` uvicorn servers on loopback ports of their own (printed as one line), each with the engine's `/load`
    (JSON, or the pushed stream with ?watch=1)."""
    import socket

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from pypto_serving.contract import LoadReport
    from pypto_serving.engine.load_feed import LoadFeed

    def app() -> FastAPI:
        api = FastAPI()
        load = {"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0, "max_num_seqs": 8}
        feed = LoadFeed(lambda snapshot: LoadReport(**snapshot))
        feed.publish(load, [])

        @api.get("/load")
        async def load_route(watch: str | None = None) -> Response:
            if watch:
                return StreamingResponse(feed.stream(), media_type="text/event-stream")
            return JSONResponse(LoadReport(**load).to_json())

        return api

    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    print(",".join(str(sock.getsockname()[1]) for sock in sockets), flush=True)

    async def main() -> None:
        servers = [uvicorn.Server(uvicorn.Config(app(), log_level="warning", lifespan="off")) for _ in sockets]
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in zip(servers, sockets, strict=True)))

    asyncio.run(main())


def measure(count: int, seconds: float, watch: bool) -> dict:
    engines = subprocess.Popen([sys.executable, __file__, "--fake-engines", str(count)], stdout=subprocess.PIPE,
                               text=True)
    urls = [f"http://127.0.0.1:{port}" for port in engines.stdout.readline().strip().split(",")]
    try:
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    httpx.get(url + "/load", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the fake engines did not start"
                    time.sleep(0.1)
        args = ["--endpoints", ",".join(urls)] + ([] if watch else ["--no-load-watch"])
        gw = gateway(*args)
        try:
            deadline = time.monotonic() + 30
            while True:
                replicas = httpx.get(gw.url + "/replicas", timeout=5).json()["replicas"]
                if all(r["load"] is not None for r in replicas):
                    break
                assert time.monotonic() < deadline, "the gateway got no reading of every replica"
                time.sleep(0.2)
            time.sleep(1.0)  # connections settled
            gw_before, engines_before, started = cpu_seconds(gw.proc.pid), cpu_seconds(engines.pid), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            gw_cpu = cpu_seconds(gw.proc.pid) - gw_before
            engine_cpu = cpu_seconds(engines.pid) - engines_before
            sources = {r["load_source"] for r in httpx.get(gw.url + "/replicas", timeout=5).json()["replicas"]}
        finally:
            gw.stop()
    finally:
        engines.terminate()
        engines.wait(30)
    return {"replicas": count, "mode": "watch" if watch else "poll", "load_sources": sorted(sources),
            "gateway_cpu_ms_per_s": round(1000 * gw_cpu / elapsed, 2),
            "engines_cpu_ms_per_s": round(1000 * engine_cpu / elapsed, 2), "seconds": round(elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="4,16,64")
    parser.add_argument("--seconds", type=float, default=30.0, help="per configuration (CPU time has 10 ms ticks)")
    parser.add_argument("--fake-engines", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fake_engines:
        serve_fake_engines(int(args.fake_engines))
        return 0
    rows = []
    for count in (int(n) for n in args.replicas.split(",")):
        for watch in (True, False):
            print(f"measuring {count} replicas, {'pushed load' if watch else 'polling'} ({args.seconds:g} s)...",
                  flush=True)
            row = measure(count, args.seconds, watch)
            rows.append(row)
            print(f"  gateway {row['gateway_cpu_ms_per_s']} ms CPU/s, engines {row['engines_cpu_ms_per_s']} ms CPU/s "
                  f"(sources {row['load_sources']})", flush=True)
    write_result("gateway_idle", {"rows": rows, "note": "CPU milliseconds per second of wall time, nothing served; "
                                  "engines: all fake replicas together (one process)"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
