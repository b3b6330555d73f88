"""`pypto-serving gateway`: run the load-aware gateway (see CONTRACT.md, "Command line")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from pypto_serving.gateway.app import Gateway
from pypto_serving.gateway.breaker import BreakerConfig
from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.discovery import Discovery, KubernetesDiscovery, StaticDiscovery
from pypto_serving.gateway.policies import DEFAULT_POLICY, POLICIES, PolicyConfig
from pypto_serving.gateway.server import Server
from pypto_serving.startup import freeze_startup_objects

log = logging.getLogger("pypto_serving.gateway")
STOP_S = 2.0  # after the grace period: at most this long to stop discovery, polling and the upstream pool


def parser() -> argparse.ArgumentParser:
    """The gateway's command line."""
    p = argparse.ArgumentParser(prog="pypto-serving gateway", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (in a pod: the pod IP)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES), help="default routing policy")
    src = p.add_argument_group("discovery (one of)")
    src.add_argument("--endpoints", help="static engine URLs, comma separated: http://a:8000,http://b:8000")
    src.add_argument("--namespace", help="namespace of the engine pods (default: the pod's own)")
    src.add_argument("--selector", help="label selector of the engine pods, e.g. "
                     "app.kubernetes.io/instance=demo,app.kubernetes.io/component=engine")
    src.add_argument("--kubeconfig", help="kubeconfig outside a cluster (default: in-cluster, then KUBECONFIG)")
    src.add_argument("--engine-port", type=int, default=8000, help="engine port when a pod names no 'http' port")
    p.add_argument("--api-key-file", type=Path, help="file holding the bearer API key required on /v1/*")
    t = p.add_argument_group("tuning")
    d = GatewayConfig()
    pc, bc = PolicyConfig(), BreakerConfig()
    t.add_argument("--load-watch", action=argparse.BooleanOptionalAction, default=d.load_watch,
                   help="take each engine's pushed load (GET /load?watch=1); --no-load-watch: poll every engine")
    t.add_argument("--poll-interval", type=float, default=d.poll_interval_s,
                   help="seconds between /load polls (engines without a load stream, or --no-load-watch)")
    t.add_argument("--poll-timeout", type=float, default=d.poll_timeout_s)
    t.add_argument("--stale-after", type=float, default=pc.stale_after_s, help="seconds before a load is stale")
    t.add_argument("--saturation-tokens", type=int, default=d.saturation_tokens,
                   help="answer 429 when every replica has this many pending tokens (0: never)")
    t.add_argument("--queue-wait", type=float, default=d.queue_wait_s,
                   help="seconds a request may wait at the gateway for a free batch slot on any replica before "
                   "it queues at an engine (0: never wait at the gateway)")
    t.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="requests waiting at the gateway at most; more go straight to an engine's queue")
    t.add_argument("--engine-queue-depth", type=int, default=d.engine_queue_depth,
                   help="requests each replica may queue beyond its batch slots before new ones wait at the gateway")
    t.add_argument("--retry-after", type=int, default=d.retry_after_s, help="Retry-After seconds of a 429")
    t.add_argument("--max-retries", type=int, default=d.max_retries)
    t.add_argument("--breaker-failures", type=int, default=bc.failures, help="consecutive failures that eject")
    t.add_argument("--breaker-backoff", type=float, default=bc.backoff_s, help="first ejection, seconds")
    t.add_argument("--breaker-max-backoff", type=float, default=bc.max_backoff_s)
    t.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s)
    t.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="max upstream silence, seconds")
    t.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit (413)")
    t.add_argument("--max-upstream-body-bytes", type=int, default=d.max_upstream_body_bytes,
                   help="a replica's answer over this is a 502 (a stream is cut)")
    t.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout_s,
                   help="seconds before an idle client connection, or an incomplete request head, is closed")
    t.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="a request body must arrive within this many seconds plus one per --body-min-rate bytes")
    t.add_argument("--body-min-rate", type=int, default=d.body_min_rate, help="bytes per second, see --body-timeout")
    t.add_argument("--send-timeout", type=float, default=d.send_timeout_s,
                   help="a client that takes no data for this many seconds while written to is cut")
    t.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="client connections; one more gets a 503 and is closed")
    t.add_argument("--max-headers", type=int, default=d.max_headers, help="header lines per request (431 above)")
    t.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="bytes of the request line and of each header line (431 above)")
    t.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                   help="after SIGTERM, answers in flight may finish for this many seconds")
    t.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    t.add_argument("--balance-epsilon", type=float, default=pc.balance_epsilon)
    t.add_argument("--balance-slack-tokens", type=int, default=pc.balance_slack_tokens)
    t.add_argument("--prefix-block-chars", type=int, default=pc.prefix_block_chars)
    t.add_argument("--prefix-blocks", type=int, default=pc.prefix_blocks)
    p.add_argument("--log-level", default="info")
    return p


def build(args: argparse.Namespace) -> tuple[GatewayConfig, Discovery]:
    """Turn parsed arguments into a config and a discovery (SystemExit on bad combinations)."""
    if bool(args.endpoints) == bool(args.selector):
        raise SystemExit("pypto-serving gateway: give exactly one of --endpoints or --selector (with --namespace)")
    if not 0 <= args.queue_wait < float("inf"):
        raise SystemExit("pypto-serving gateway: --queue-wait must be a number of seconds >= 0 (0: no queue)")
    if args.max_queued < 0 or args.engine_queue_depth < 0:
        raise SystemExit("pypto-serving gateway: --max-queued and --engine-queue-depth must be >= 0")
    api_key = None
    if args.api_key_file is not None:
        api_key = args.api_key_file.read_text().strip()
        if not api_key:
            raise SystemExit(f"pypto-serving gateway: {args.api_key_file} is empty")
    config = GatewayConfig(
        policy=args.policy, api_key=api_key, load_watch=args.load_watch, poll_interval_s=args.poll_interval,
        poll_timeout_s=args.poll_timeout,
        saturation_tokens=args.saturation_tokens, retry_after_s=args.retry_after, queue_wait_s=args.queue_wait,
        max_queued=args.max_queued, engine_queue_depth=args.engine_queue_depth, max_retries=args.max_retries,
        connect_timeout_s=args.connect_timeout, idle_timeout_s=args.idle_timeout,
        max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
        max_upstream_body_bytes=args.max_upstream_body_bytes, keepalive_timeout_s=args.keepalive_timeout,
        body_timeout_s=args.body_timeout, body_min_rate=max(1, args.body_min_rate), send_timeout_s=args.send_timeout,
        max_connections=args.max_connections, max_headers=args.max_headers, max_header_bytes=args.max_header_bytes,
        shutdown_grace_s=args.shutdown_grace,
        policy_config=PolicyConfig(stale_after_s=args.stale_after, balance_epsilon=args.balance_epsilon,
                                   balance_slack_tokens=args.balance_slack_tokens,
                                   prefix_block_chars=args.prefix_block_chars, prefix_blocks=args.prefix_blocks),
        breaker=BreakerConfig(failures=args.breaker_failures, backoff_s=args.breaker_backoff,
                              max_backoff_s=args.breaker_max_backoff))
    if args.endpoints:
        try:
            discovery: Discovery = StaticDiscovery(args.endpoints.split(","))
        except ValueError as exc:
            raise SystemExit(f"pypto-serving gateway: --endpoints: {exc} (expected http://host:port,...)") from None
    else:
        try:
            discovery = KubernetesDiscovery(args.namespace, args.selector, args.kubeconfig, args.engine_port)
        except ValueError as exc:
            raise SystemExit(f"pypto-serving gateway: --selector: {exc}") from None
    return config, discovery


async def serve(config: GatewayConfig, discovery: Discovery, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let answers in flight finish for the grace period; the
    process is gone within the grace period plus STOP_S."""
    gateway = Gateway(config, discovery)
    await gateway.start()
    server = Server(gateway.dispatch, gateway.limits)
    await server.listen(host, port)
    freeze_startup_objects()
    log.info("gateway listening on http://%s:%d (policy %s)", host, port, config.policy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping: %d client connection(s) open", len(server.connections))
    await server.shutdown(config.shutdown_grace_s)
    try:
        await asyncio.wait_for(gateway.stop(), STOP_S)
    except asyncio.TimeoutError:
        log.warning("gateway: discovery, polling or the upstream pool did not stop within %.0f s", STOP_S)


def raise_fd_limit() -> None:
    """Every proxied stream holds two sockets: lift the soft open-files limit to the hard one."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pypto-serving gateway`."""
    args = parser().parse_args(argv)
    raise_fd_limit()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx2", "httpcore2"):  # the pod watch's client logs every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config, discovery = build(args)
    try:
        import uvloop  # a dependency on Linux; asyncio elsewhere
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(config, discovery, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
