"""Proxying one request: route, dispatch, retry before the first byte, relay (streaming unbuffered), account.

Flow of a request (see docs/architecture.md, "Gateway"):
0. while no replica has a free batch slot, the request waits at the gateway (gateway/slot_queue.py);
1. candidates = eligible replicas (discovered ready, not draining, breaker closed or half-open) not tried yet;
   none at all -> 503; every candidate at the saturation threshold -> 429 with Retry-After;
2. the policy picks one (timed into the routing-decision histogram); its estimated tokens are dispatched;
3. connection failure/timeout before a response, or a 503 answer -> try another replica (at most
   ``max_retries`` more); once bytes went to the client nothing is retried;
4. the response is relayed as it arrives (what one read from the replica brought is written through at once); a
   client disconnect cancels the handler, which closes the upstream connection, so the engine aborts the request;
   a client that takes nothing for the send timeout is cut the same way.

Headers (RFC 9110, section 7.6.1): hop-by-hop fields, and every field the ``Connection`` header names, are not
forwarded either way; ``X-Forwarded-For`` and ``Forwarded`` get the client's address appended; the client's
``Authorization`` (the gateway's own API key) stays at the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

from aiohttp import web

from pypto_serving.contract import DISPATCH_HEADER, REPLICA_HEADER, REQUEST_ID_HEADER
from pypto_serving.gateway.client import (
    Client,
    ConnectFailed,
    ReadTimeout,
    Response,
    UpstreamClosed,
    UpstreamError,
    UpstreamInvalid,
)
from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.errors import error_body, error_response
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import Policy
from pypto_serving.gateway.replicas import Registry, Replica
from pypto_serving.gateway.request import RequestInfo
from pypto_serving.gateway.server import send
from pypto_serving.gateway.slot_queue import SlotQueue

log = logging.getLogger("pypto_serving.gateway")

# never forwarded: hop-by-hop (RFC 9110 7.6.1), framing set anew, Expect (the gateway already read the body), Host
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
                        "expect", DISPATCH_HEADER})  # the dispatch id is the gateway's own, set per attempt
NOT_RELAYED = HOP_BY_HOP | {"server", "date"}  # the gateway's own


def connection_named(headers: list[tuple[str, str]]) -> frozenset[str]:
    """The field names listed in the ``Connection`` headers (hop-by-hop by declaration)."""
    named = [token.strip().lower() for name, value in headers if name == "connection" for token in value.split(",")]
    return frozenset(named) if named else frozenset()


def forward_headers(request: web.BaseRequest, strip_authorization: bool) -> tuple[list[tuple[str, str]], str]:
    """Request headers for the replica, and the request id.

    Dropped: hop-by-hop fields and those named in ``Connection``, Host and Content-Length (set anew), and
    ``Authorization`` when it carries the gateway's key. Appended: the client's address to ``X-Forwarded-For`` and
    ``Forwarded``. A request without ``x-request-id`` gets one here, so every attempt (retries included) carries
    the same id to the engines, which echo it on their responses.
    """
    raw = [(k.decode("latin-1").lower(), v.decode("utf-8", "surrogateescape")) for k, v in request.raw_headers]
    drop = HOP_BY_HOP | connection_named(raw)
    if strip_authorization:
        drop = drop | {"authorization"}
    out, request_id, xff, forwarded = [], None, [], []
    for name, value in raw:
        if name in drop:
            continue
        if name == "x-forwarded-for":
            xff.append(value)
        elif name == "forwarded":
            forwarded.append(value)
        else:
            out.append((name, value))
            if name == REQUEST_ID_HEADER and request_id is None:
                request_id = value
    client = request.remote or "unknown"
    xff.append(client)
    node = f'"[{client}]"' if ":" in client else client
    forwarded.append(f"for={node};proto=http")
    out += [("x-forwarded-for", ", ".join(xff)), ("forwarded", ", ".join(forwarded))]
    if request_id is None:
        request_id = new_request_id()
        out.append((REQUEST_ID_HEADER, request_id))
    return out, request_id


def new_request_id() -> str:
    """A 128-bit random hex id. From the process's Mersenne Twister (seeded from os.urandom when the process
    starts), not uuid4: an id needs uniqueness, not secrecy, and os.urandom is one syscall per request."""
    return f"{random.getrandbits(128):032x}"


_DISPATCH_PREFIX = f"{random.getrandbits(48):012x}-"  # this gateway process
_dispatch_serial = itertools.count()


def next_dispatch_id() -> str:
    """A new attempt id, unique to this gateway process: the engine lists it in its pushed load once admitted."""
    return f"{_DISPATCH_PREFIX}{next(_dispatch_serial)}"


def response_headers(upstream: Response, replica: Replica, request_id: str) -> list[tuple[str, str]]:
    """Upstream response headers for the client (no hop-by-hop, none named in ``Connection``, no Server/Date) plus
    ``x-pypto-replica`` (and ``x-request-id`` unless the replica echoed it)."""
    drop = NOT_RELAYED | connection_named(upstream.headers)
    out = [(name, value) for name, value in upstream.headers if name not in drop]
    out.append((REPLICA_HEADER, replica.name))
    if not any(name == REQUEST_ID_HEADER for name, _ in out):
        out.append((REQUEST_ID_HEADER, request_id))
    return out


class Streamed(web.StreamResponse):
    """A relayed stream whose head leaves together with its first piece (one write instead of two)."""

    _send_headers_immediately = False


class Retry(Exception):
    """This attempt did not reach an answer; try another replica."""

    def __init__(self, reason: str, status: int, payload: bytes, replica: str) -> None:
        super().__init__(reason)
        self.reason, self.status, self.payload, self.replica = reason, status, payload, replica


class Proxy:
    """Routes and relays requests to the replicas of a registry."""

    def __init__(self, config: GatewayConfig, registry: Registry, metrics: GatewayMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        # Pooled keep-alive connections; no cookie jar, so a cookie that one client's answer set never rides
        # along on another client's request.
        self.client = Client(config.connect_timeout_s, config.idle_timeout_s, config.max_upstream_body_bytes)
        self.slots = SlotQueue(registry, config.queue_wait_s, config.max_queued, config.policy_config.stale_after_s,
                               config.engine_queue_depth)

    async def stop(self) -> None:
        """Close the upstream connections."""
        await self.client.close()

    # --- routing ----------------------------------------------------------------------------------------------
    def choose(self, policy: Policy, info: RequestInfo, tried: list[str]) -> Replica | web.Response:
        """Pick a replica for one attempt, or the error response when there is none to pick."""
        started = time.perf_counter()
        now = self.registry.clock()
        candidates = self.registry.eligible(tried, now)
        if not candidates:
            return error_response(503, "no ready engine replica to serve the request" if not tried else
                                  "every ready replica failed this request", code="no_replicas")
        threshold = self.config.saturation_tokens
        if threshold > 0 and info.tokens > 0:
            stale = self.config.policy_config.stale_after_s
            candidates = [r for r in candidates if r.pending_tokens(stale, now) < threshold]
            if not candidates:
                return error_response(429, "every replica is saturated; retry later", code="saturated",
                                      headers={"Retry-After": str(self.config.retry_after_s)})
        replica = candidates[0] if len(candidates) == 1 else policy.select(candidates, info, now)
        self.metrics.decision.observe(time.perf_counter() - started)
        return replica

    def count_done(self, replica: Replica, status: int) -> None:
        """Count an answered request and tell the replica's breaker how it went."""
        self.metrics.count(replica.name, str(status))
        if status < 500:
            self.registry.success(replica)
        else:
            self.registry.failure(replica)

    # --- proxying ---------------------------------------------------------------------------------------------
    async def serve(self, request: web.BaseRequest, path: str, body: bytes | None, info: RequestInfo,
                    policy: Policy, received_at: float) -> web.StreamResponse:
        """Serve one request to ``path`` on a replica, with retries; returns the (possibly streamed) answer."""
        headers, request_id = forward_headers(request, self.config.api_key is not None)
        method = "GET" if request.method == "HEAD" else request.method  # aiohttp drops a HEAD answer's body
        tried: list[str] = []
        last: Retry | None = None
        waited = await self.slots.wait()
        if waited:
            self.metrics.queue_wait.observe(waited)
            received_at += waited  # the overhead histogram measures the gateway's own time
        while True:
            if last is not None and len(tried) > self.config.max_retries:
                return self.replica_error(last, request_id)
            chosen = self.choose(policy, info, tried)
            if isinstance(chosen, web.Response):
                if last is not None and chosen.status == 503:  # report what the replicas said
                    return self.replica_error(last, request_id)
                self.metrics.count(last.replica if last else "none", str(chosen.status))
                chosen.headers[REQUEST_ID_HEADER] = request_id
                return chosen
            if tried:
                self.metrics.retries.labels(last.reason if last else "connect").inc()
            else:
                self.metrics.overhead_request.observe(time.perf_counter() - received_at)
            tried.append(chosen.name)
            try:
                return await self.attempt(request, chosen, method, path, headers, body, info, request_id)
            except Retry as retry:
                last = retry

    def replica_error(self, last: Retry, request_id: str) -> web.Response:
        """The answer that reports the last replica's failure, counted."""
        self.metrics.count(last.replica, str(last.status))
        return web.Response(status=last.status, body=last.payload, content_type="application/json",
                            headers={REPLICA_HEADER: last.replica, REQUEST_ID_HEADER: request_id})

    async def attempt(self, request: web.BaseRequest, replica: Replica, method: str, path: str,
                      headers: list[tuple[str, str]], body: bytes | None, info: RequestInfo,
                      request_id: str) -> web.StreamResponse:
        """One attempt on ``replica``: its answer, or `Retry` when it can go elsewhere."""
        dispatch_id = next_dispatch_id()
        ticket = replica.dispatch(info.tokens, info.stream, dispatch_id)
        dispatched = time.perf_counter()
        url = replica.url + path
        headers = [*headers, (DISPATCH_HEADER, dispatch_id)]
        upstream: Response | None = None
        try:
            try:
                upstream = await self.client.send(method, url, headers, body)
            except UpstreamClosed:
                # Most often a kept-alive connection that the replica closed as we sent (its idle timeout): the
                # request never reached it, so it goes once more to the same replica on a new connection.
                upstream = await self.client.send(method, url, headers, body, fresh=True)
            ticket.accepted()
            if upstream.status == 503:  # not served: read the reason, then retry elsewhere
                payload = await upstream.read()
                replica.refused()
                raise Retry("unavailable", 503, payload, replica.name)
            return await self.relay(request, replica, upstream, request_id, dispatched)
        except (asyncio.CancelledError, ConnectionError):  # the client went away, or was cut (`SendTimeout`)
            self.metrics.count(replica.name, "499")
            raise
        except UpstreamError as error:
            return self.failed(request, replica, upstream, error, request_id)
        finally:
            if upstream is not None:
                upstream.release()
            ticket.end()
            self.registry.capacity_changed()

    async def relay(self, request: web.BaseRequest, replica: Replica, upstream: Response, request_id: str,
                    dispatched: float) -> web.StreamResponse:
        """Relay the replica's answer: a sized one whole, anything else piece by piece as it arrives."""
        metrics = self.metrics
        status = upstream.status
        headers = response_headers(upstream, replica, request_id)
        streamed = upstream.content_length is None or upstream.content_type.startswith("text/event-stream")
        if not streamed:
            payload = await upstream.read()
            first_body_at = time.perf_counter()
            response = web.Response(status=status, body=payload)
            response.headers.extend(headers)
            self.count_done(replica, status)
            await send(request, response, b"", self.config.send_timeout_s, last=True)
            metrics.overhead_response.observe(time.perf_counter() - first_body_at)
            return response
        chunk = await upstream.next_chunk()
        first_body_at = time.perf_counter()
        if chunk:
            metrics.ttft(replica.name, first_body_at - dispatched)
        response = Streamed(status=status)
        response.headers.extend(headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        send_timeout = self.config.send_timeout_s
        first = True
        while not upstream.complete:  # each piece as it came (the head leaves with the first one)
            await send(request, response, chunk, send_timeout)
            if first:
                metrics.overhead_response.observe(time.perf_counter() - first_body_at)
                first = False
            chunk = await upstream.next_chunk()
        self.count_done(replica, status)
        await send(request, response, chunk, send_timeout, last=True)  # the last piece and the end in one write
        if first:
            metrics.overhead_response.observe(time.perf_counter() - first_body_at)
        return response

    def failed(self, request: web.BaseRequest, replica: Replica, upstream: Response | None, error: UpstreamError,
               request_id: str) -> web.StreamResponse:
        """The attempt failed: `Retry` before the replica answered, else 502/504, or cut a started stream."""
        self.registry.failure(replica)
        ids = {REPLICA_HEADER: replica.name, REQUEST_ID_HEADER: request_id}
        if request.writer.output_size > 0:  # bytes reached the client: no retry; it sees a truncated answer
            self.metrics.count(replica.name, "502")
            log.warning("replica %s failed mid-answer: %s", replica.name, error)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"replica {replica.name} failed mid-answer")
        if isinstance(error, ReadTimeout):  # it took the request, then went silent: no re-run
            self.metrics.count(replica.name, "504")
            return error_response(504, f"replica {replica.name} sent nothing for {self.config.idle_timeout_s:g}s",
                                  code="upstream_timeout", headers=ids)
        if upstream is not None or isinstance(error, UpstreamInvalid):  # it answered, badly: no re-run
            self.metrics.count(replica.name, "502")
            return error_response(502, f"replica {replica.name} sent an invalid answer: {error}",
                                  code="upstream_failed", headers=ids)
        reason = "timeout" if isinstance(error, ConnectFailed) and error.timed_out else "connect"
        raise Retry(reason, 502, error_body(502, f"replica {replica.name} unreachable: {error}",
                                            code="upstream_unreachable"), replica.name)
