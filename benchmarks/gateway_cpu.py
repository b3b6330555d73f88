"""CPU per request of gateway builds (and nginx) behind a fake engine: the proxy's own cost, without the engine's noise.

A real engine makes every proxy measurement on this machine noisy (it takes a core, and its step timing moves
latencies by milliseconds). Here the upstream is a fake engine (this script with ``--fake-engine``, on uvloop and
httptools) that answers every completion with the bytes a real engine sends for a streamed ``max_tokens`` 1
request: the head at once, the body either on the next loop turn (``--step-ms 0``: the proxy is saturated, its
caches warm) or at the next tick of a fixed step (``--step-ms 30``: requests arrive in bursts after idle gaps, as
behind an engine at concurrency 32, and meet cold caches). wrk drives each proxy in turn, alternating over
rounds; the number is the proxy's CPU seconds / requests (from /proc). Builds are git revisions or ``WORKTREE``
(benchmarks/gateway_ab.py makes runnable copies), or ``nginx``.
The peer routers (smg, vllm-router, sglang-router from the venv of `make peers`) are measured the same way.
Run: `.venv/bin/python benchmarks/gateway_cpu.py --builds HEAD,WORKTREE,nginx [--step-ms 30] [--rounds 4]`;
prints, and with ``--record`` writes docs/benchmarks/gateway_cpu.json.
Measured before the proxy ran from callbacks (step 30 ms): nginx ~40-45 us, the gateway ~105-115 us;
a 40-line callback-only proxy on the same uvloop + httptools (no routing, no accounting, no task per request)
~55 us, and ~65-70 us with one task and one future per request. After (2026-11-22, a noisier day): step 30 ms the
gateway 80-95 us, nginx 43-46 us; saturated 45 us, nginx 25 us.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_ab import WORKTREE, build_tree
from benchmarks.gateway_common import PEERS_VENV, Nginx, PeerRouter, cpu_seconds, peer_commands, write_result
from benchmarks.gateway_overhead import wrk_mixed
from tests.gateway.harness import GatewayProcess, start_gateway
from tests.support.common import free_port, wait_for

MODEL = "fake"
EVENT = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "text": " boils", "finish_reason": "length", "logprobs": None}]}
USAGE = {**EVENT, "choices": [], "usage": {"prompt_tokens": 56, "completion_tokens": 1, "total_tokens": 57}}
SSE = f"data: {json.dumps(EVENT)}\n\ndata: {json.dumps(USAGE)}\n\ndata: [DONE]\n\n".encode()
HEAD = (b"HTTP/1.1 200 OK\r\ncache-control: no-cache\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"x-request-id: 0\r\ntransfer-encoding: chunked\r\n\r\n")
BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SSE), SSE)  # one write: the engine sends the end of a stream at once
LOAD = json.dumps({"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0, "max_num_seqs": 64})
MODELS = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


def serve_fake_engine(port: int, step_s: float) -> None:
    """Run the fake engine until killed."""
    import httptools
    import uvloop

    due: list[asyncio.Transport] = []  # streams whose body goes out at the next step

    class Engine(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_message_complete(self) -> None:
            url, self.url = self.url, b""
            if self.parser.get_method() == b"GET":
                body = (LOAD if url.startswith(b"/load") else MODELS).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
                return
            self.transport.write(HEAD)
            if step_s:
                due.append(self.transport)
            else:
                asyncio.get_running_loop().call_soon(self.transport.write, BODY)

    async def steps() -> None:
        while True:
            await asyncio.sleep(step_s)
            batch = due[:]
            due.clear()
            for transport in batch:
                if not transport.is_closing():
                    transport.write(BODY)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Engine, "127.0.0.1", port, backlog=1024)
        await asyncio.gather(server.serve_forever(), *([steps()] if step_s else []))

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--builds", default=f"HEAD,{WORKTREE},nginx", help=f"git revisions, {WORKTREE} or nginx")
    p.add_argument("--step-ms", type=float, default=30.0, help="0: answer at once (the proxy saturated)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per proxy per round")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--peers", default="smg least_load,vllm-router cache_aware,sglang-router cache_aware",
                   help="peer routers to measure too (from the venv of `make peers`; empty: none)")
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV)
    p.add_argument("--record", action="store_true", help="write docs/benchmarks/gateway_cpu.json")
    p.add_argument("--fake-engine", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fake_engine:
        serve_fake_engine(args.fake_engine, args.step_ms / 1000)
        return 0
    work = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    port = free_port()
    engine = subprocess.Popen([sys.executable, __file__, "--fake-engine", str(port), "--step-ms", str(args.step_ms)])
    proxies: dict[str, GatewayProcess | Nginx | PeerRouter] = {}
    try:
        upstream = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(upstream + "/load", timeout=2).status_code == 200, 30, "the fake engine")
        for index, build in enumerate(args.builds.split(",")):
            if build == "nginx":
                proxies[build] = Nginx([upstream])
            else:
                proxies[f"{index}:{build}"] = start_gateway("--endpoints", upstream, timeout=60,
                                                            cwd=build_tree(build, work / str(index)))
        commands = peer_commands(args.peers_venv, [upstream])
        for name in filter(None, args.peers.split(",")):
            if name not in commands:
                print(f"skipping {name}: not in {args.peers_venv} (`make peers`)", file=sys.stderr)
                continue
            proxies[name] = PeerRouter(commands[name], work / f"{name.replace(' ', '-')}.log")
        per_request: dict[str, list[float]] = {name: [] for name in proxies}
        for name, proxy in proxies.items():
            wrk_mixed({name: proxy.url}, MODEL, args.connections, 1)  # warm-up
        for round_no in range(args.rounds):
            for name, proxy in proxies.items():
                pid = proxy.proc.pid  # nginx: the master, its worker counted with it
                before = cpu_seconds(pid)
                requests = wrk_mixed({name: proxy.url}, MODEL, args.connections, args.seconds)[name]["requests"]
                per_request[name].append((cpu_seconds(pid) - before) / requests * 1e6)
                print(f"round {round_no + 1}/{args.rounds} {name}: {requests / args.seconds:,.0f} requests/s, "
                      f"{per_request[name][-1]:.1f} us CPU per request", flush=True)
        print(f"CPU per request, step {args.step_ms:g} ms, {args.connections} connections "
              f"(median and range of {args.rounds} rounds):")
        for name, values in per_request.items():
            print(f"  {name:28s} {statistics.median(values):6.1f} us  [{min(values):.1f} .. {max(values):.1f}]")
        if args.record:
            write_result("gateway_cpu", {"step_ms": args.step_ms, "connections": args.connections,
                                         "rounds": args.rounds, "seconds": args.seconds,
                                         "cpu_us_per_request": {name: {"median": round(statistics.median(v), 1),
                                                                       "min": round(min(v), 1),
                                                                       "max": round(max(v), 1)}
                                                                for name, v in per_request.items()}})
    finally:
        for proxy in proxies.values():
            proxy.stop()
        engine.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
