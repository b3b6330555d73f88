"""Which HTTP libraries should carry the gateway? The candidate stacks as bare pass-through proxies, side by side.

Each candidate is the smallest streaming reverse proxy its libraries allow (read the request body, send it
upstream, relay the response as it arrives), run as its own process on uvloop in front of one fast fake engine
(a raw asyncio server that answers every request with the engine's short SSE stream), so the only difference
between two rows is the client-facing server and the upstream client:

* ``aiohttp+aiohttp``: aiohttp's low-level ``web.Server`` (llhttp in C) and an aiohttp ``ClientSession``;
* ``uvicorn+aiohttp``: uvicorn's httptools protocol with a raw ASGI app, and an aiohttp ``ClientSession``;
* ``aiohttp+httpx``: aiohttp's server and an ``httpx.AsyncClient`` (h11, pure Python) for upstream;
* ``nginx``: the reference (C, one worker).

wrk drives each one alone for ``--seconds`` per round at concurrency 1 and 32 (rounds alternate the order).
Reported per stack: the median over rounds of requests/s, p50 and p99, and the proxy's CPU per request (user +
system seconds / requests: the least noisy figure on a shared machine). granian is not a candidate: it is not in
the lock, and it brings its own process manager and signal handling around the app.
Run: `.venv/bin/python benchmarks/gateway_stacks.py [--rounds 3] [--seconds 5]`; writes
docs/benchmarks/gateway_stacks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STACKS = ("aiohttp+aiohttp", "uvicorn+aiohttp", "aiohttp+httpx", "nginx")
SSE = (b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"x","finish_reason":null}]}'
       b'\n\ndata: {"id":"cmpl-1","object":"text_completion","choices":[],"usage":{"prompt_tokens":24,'
       b'"completion_tokens":1,"total_tokens":25}}\n\ndata: [DONE]\n\n')
BODY = json.dumps({"model": "m", "prompt": "measure the proxy overhead " * 4, "max_tokens": 1, "stream": True})


# --- the fake engine ----------------------------------------------------------------------------------------------
def serve_fake_engine(port: int) -> None:
    """Answer every request with a chunked SSE stream of one token (keep-alive)."""
    import httptools
    import uvloop

    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    answer = head + f"{len(SSE):x}\r\n".encode() + SSE + b"\r\n0\r\n\r\n"

    class Engine(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(answer)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Engine, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


# --- the candidates -----------------------------------------------------------------------------------------------
def serve_aiohttp(port: int, upstream: str, client_kind: str) -> None:
    """aiohttp's low-level server; upstream through aiohttp or httpx."""
    import aiohttp
    import httpx
    import uvloop
    from aiohttp import web

    async def main() -> None:
        if client_kind == "aiohttp":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        else:
            client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            headers = {"content-type": "application/json"}
            if client_kind == "aiohttp":
                async with session.post(upstream + request.path, data=body, headers=headers) as up:
                    response = web.StreamResponse(status=up.status, headers={"content-type": up.content_type})
                    await response.prepare(request)
                    async for chunk in up.content.iter_any():
                        await response.write(chunk)
            else:
                async with client.stream("POST", upstream + request.path, content=body, headers=headers) as up:
                    response = web.StreamResponse(status=up.status_code,
                                                  headers={"content-type": up.headers["content-type"]})
                    await response.prepare(request)
                    async for chunk in up.aiter_raw():
                        await response.write(chunk)
            await response.write_eof()
            return response

        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_uvicorn(port: int, upstream: str) -> None:
    """uvicorn's httptools protocol with a raw ASGI app; upstream through aiohttp."""
    import aiohttp
    import uvicorn

    session: aiohttp.ClientSession | None = None

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        nonlocal session
        if scope["type"] != "http":
            return
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        async with session.post(upstream + scope["path"], data=bytes(body),
                                headers={"content-type": "application/json"}) as up:
            await send({"type": "http.response.start", "status": up.status,
                        "headers": [(b"content-type", up.content_type.encode())]})
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning", backlog=4096)


# --- the driver ---------------------------------------------------------------------------------------------------
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d\\n", summary.requests, latency:percentile(50),
                         latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    from benchmarks.gateway_common import ensure_wrk

    out = subprocess.run([ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
                          str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    found = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+)", out)
    if found is None:
        raise RuntimeError(f"wrk on {url} failed:\n{out}")
    n, p50, p99, errors = (int(x) for x in found.groups())
    return {"requests": n, "rps": n / seconds, "p50_ms": p50 / 1e3, "p99_ms": p99 / 1e3, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve == "engine":
        serve_fake_engine(args.port)
        return 0
    if args.serve in ("aiohttp+aiohttp", "aiohttp+httpx"):
        serve_aiohttp(args.port, args.upstream, args.serve.split("+")[1])
        return 0
    if args.serve == "uvicorn+aiohttp":
        serve_uvicorn(args.port, args.upstream)
        return 0

    import httpx

    from benchmarks.gateway_common import Nginx, cpu_seconds, write_result
    from tests.support.common import free_port, wait_for

    procs: list[subprocess.Popen] = []

    def spawn(role: str, upstream: str = "") -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", role, "--port", str(port),
                                 "--upstream", upstream])
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.post(url + "/v1/completions", content=BODY, timeout=2).status_code == 200, 30, role)
        return url, proc

    script = Path(tempfile.mkdtemp(prefix="bench-stacks-")) / "post.lua"
    script.write_text(WRK_SCRIPT % BODY)
    nginx = None
    started = time.time()
    try:
        engine_url, _ = spawn("engine")
        targets: dict[str, tuple[str, int]] = {}
        for stack in STACKS:
            if stack == "nginx":
                nginx = Nginx([engine_url])
                targets[stack] = (nginx.url, nginx.proc.pid)
            else:
                url, proc = spawn(stack, engine_url)
                targets[stack] = (url, proc.pid)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {"c1": [], "c32": []} for s in STACKS}
        for round_no in range(args.rounds):
            order = list(STACKS) if round_no % 2 == 0 else list(reversed(STACKS))
            for concurrency in (1, 32):
                for stack in order:
                    url, pid = targets[stack]
                    cpu = cpu_seconds(pid)
                    result = wrk(url + "/v1/completions", concurrency, args.seconds, script)
                    result["cpu_us_per_request"] = (cpu_seconds(pid) - cpu) / result["requests"] * 1e6
                    samples[stack][f"c{concurrency}"].append(result)
            print(f"round {round_no + 1}/{args.rounds} done", flush=True)
        table = {stack: {conc: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                         for conc, rows in by_conc.items()} for stack, by_conc in samples.items()}
        print(f"{'stack':16s} {'c1 p50':>8s} {'c1 CPU/req':>10s} {'c32 rps':>8s} {'c32 p50':>8s} {'c32 p99':>8s} "
              f"{'c32 CPU/req':>11s}")
        for stack, row in table.items():
            c1, c32 = row["c1"], row["c32"]
            print(f"{stack:16s} {c1['p50_ms']:6.2f}ms {c1['cpu_us_per_request']:8.0f}us {c32['rps']:8.0f} "
                  f"{c32['p50_ms']:6.2f}ms {c32['p99_ms']:6.2f}ms {c32['cpu_us_per_request']:9.0f}us")
        write_result("gateway_stacks", {"rounds": args.rounds, "seconds": args.seconds, "median": table,
                                        "samples": samples, "wall_s": round(time.time() - started, 1),
                                        "chosen": "aiohttp+aiohttp"})
    finally:
        if nginx is not None:
            nginx.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
