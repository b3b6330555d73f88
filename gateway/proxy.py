"""Proxying one request: route, dispatch, retry before the first byte, relay (streaming unbuffered), account.

Flow of a request (see docs/architecture.md, "Gateway"):
1. candidates = eligible replicas (discovered ready, not draining, breaker closed or half-open) not tried yet;
   none at all -> 503; every candidate at the saturation threshold -> 429 with Retry-After;
2. the policy picks one (timed into the routing-decision histogram); its estimated tokens are dispatched;
3. connection failure/timeout before a response, or a 503 answer -> try another replica (at most
   ``max_retries`` more); once bytes went to the client nothing is retried;
4. the response is relayed as it arrives (what one read from the replica brought is written through at once); a
   client disconnect closes the upstream connection, which makes the engine abort the request.

An `Exchange` does this from callbacks, as nginx does: the client's request is sent upstream from the callback
that parsed it, and each read from the replica is written to the client from the callback that parsed it. No
task, future or loop turn per request: at concurrency 32 the answers of one engine step reach the gateway
together, and each one leaves as soon as it is parsed instead of after all of them were (see
docs/benchmarks.md, "Gateway overhead"). Only a new upstream connection is made by a task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from pypto_serving.contract import REPLICA_HEADER, REQUEST_ID_HEADER
from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.errors import error_body, error_response
from pypto_serving.gateway.http_server import Answer, Request, Stream
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import Policy
from pypto_serving.gateway.replicas import Registry, Replica, Ticket
from pypto_serving.gateway.request import RequestInfo
from pypto_serving.gateway.upstream import (
    ConnectFailed,
    Connection,
    ReadTimeout,
    Response,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    header_fields,
)

log = logging.getLogger("pypto_serving.gateway")

# not forwarded: hop-by-hop, framing set anew, and Expect (the gateway already read the whole body)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect"})


def forward_headers(request: Request) -> tuple[list[tuple[str, str]], str]:
    """Request headers worth sending upstream (no hop-by-hop, no Host/Content-Length), and the request id.

    A request without ``x-request-id`` gets one here, so every attempt (retries included) carries the same id
    to the engines, which echo it on their responses.
    """
    out = [(k, v) for k, v in request.headers if k not in HOP_BY_HOP]  # names are in lower case
    request_id = request.header(REQUEST_ID_HEADER)
    if request_id is None:
        request_id = new_request_id()
        out.append((REQUEST_ID_HEADER, request_id))
    return out, request_id


def new_request_id() -> str:
    """A 128-bit random hex id. From the process's Mersenne Twister (seeded from os.urandom when the process
    starts), not uuid4: an id needs uniqueness, not secrecy, and os.urandom is one syscall per request."""
    return f"{random.getrandbits(128):032x}"


def response_headers(upstream: Response, replica: Replica, request_id: str) -> list[tuple[str, str]]:
    """Upstream response headers for the client plus ``x-pypto-replica`` (and ``x-request-id`` unless the
    replica echoed it)."""
    out = []
    echoed = False
    for name, value in upstream.headers:  # names are in lower case
        if name not in HOP_BY_HOP and name not in ("server", "date"):
            out.append((name, value))
            echoed = echoed or name == REQUEST_ID_HEADER
    out.append((REPLICA_HEADER, replica.name))
    if not echoed:
        out.append((REQUEST_ID_HEADER, request_id))
    return out


class Proxy:
    """Routes and relays requests to the replicas of a registry."""

    def __init__(self, config: GatewayConfig, registry: Registry, metrics: GatewayMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        # Pooled keep-alive connections; no cookie jar, so a cookie that one client's answer set never rides
        # along on another client's request.
        self.pool = UpstreamPool(config.connect_timeout_s, config.idle_timeout_s)

    def stop(self) -> None:
        """Close the idle upstream connections."""
        self.pool.close()

    # --- routing ----------------------------------------------------------------------------------------------
    def choose(self, policy: Policy, info: RequestInfo, tried: list[str]) -> Replica | Answer:
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

    # --- proxying ---------------------------------------------------------------------------------------------
    def start(self, request: Request, path: str, body: bytes | None, info: RequestInfo, policy: Policy) -> None:
        """Serve one request to ``path`` on a replica, with retries; the answer goes out through ``request``."""
        Exchange(self, request, path, body, info, policy).attempt()

    def count_done(self, replica: Replica, status: int) -> None:
        """Count an answered request and tell the replica's breaker how it went."""
        self.metrics.count(replica.name, str(status))
        if status < 500:
            self.registry.success(replica)
        else:
            self.registry.failure(replica)


class Exchange:
    """One proxied request and its attempts, driven by the callbacks of the client's and the replica's
    connections; ``over`` once its answer is settled (or the client went away)."""

    __slots__ = ("body", "connecting", "dispatched", "fields", "info", "last_error", "method", "over", "path",
                 "policy", "proxy", "reason", "replica", "request", "request_id", "stream", "ticket", "tried",
                 "upstream")

    def __init__(self, proxy: Proxy, request: Request, path: str, body: bytes | None, info: RequestInfo,
                 policy: Policy) -> None:
        self.proxy = proxy
        self.request = request
        self.method = "GET" if request.method == "HEAD" else request.method  # the server drops the body itself
        self.path = path
        self.body = body
        self.info = info
        self.policy = policy
        headers, self.request_id = forward_headers(request)
        self.fields = header_fields(headers, body)
        self.tried: list[str] = []
        self.last_error: tuple[int, bytes, str] | None = None  # status, payload, replica of the last failure
        self.reason = ""  # why the next attempt is a retry
        self.replica: Replica | None = None
        self.ticket: Ticket | None = None
        self.upstream: Response | None = None
        self.connecting: asyncio.Task[Connection] | None = None
        self.dispatched = 0.0
        self.stream: Stream | None = None
        self.over = False
        request.on_cancel = self.cancel

    # --- attempts ---------------------------------------------------------------------------------------------
    def attempt(self) -> None:
        """Route to a replica not tried yet and send the request there (or answer why there is none)."""
        proxy = self.proxy
        chosen = proxy.choose(self.policy, self.info, self.tried)
        if isinstance(chosen, Answer):
            if self.last_error is not None and chosen.status == 503:  # report what the replicas said
                self.answer(self.replica_error())
                return
            proxy.metrics.count(self.last_error[2] if self.last_error else "none", str(chosen.status))
            chosen.headers.append((REQUEST_ID_HEADER, self.request_id))
            self.answer(chosen)
            return
        if self.tried:
            proxy.metrics.retries.labels(self.reason).inc()
        else:
            proxy.metrics.overhead_request.observe(time.perf_counter() - self.request.received_at)
        self.tried.append(chosen.name)
        self.replica = chosen
        self.ticket = chosen.dispatch(self.info.tokens, self.info.stream)
        self.dispatched = time.perf_counter()
        connection = proxy.pool.take(chosen.url)
        if connection is None:
            self.connect()
        else:
            self.send(connection)

    def connect(self) -> None:
        """Open a new connection to the replica (a task), then send."""
        task = asyncio.get_running_loop().create_task(self.proxy.pool.connect(self.replica.url))  # type: ignore[union-attr]
        task.add_done_callback(self.connected)
        self.connecting = task

    def connected(self, task: asyncio.Task[Connection]) -> None:
        self.connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if self.over:  # the client went away meanwhile
            if error is None:
                task.result().close()
            return
        if isinstance(error, UpstreamError):
            self.guarded(self.failed, error)
        elif error is not None:
            self.crash(error)
        else:
            self.guarded(self.send, task.result())

    def send(self, connection: Connection) -> None:
        self.upstream = self.proxy.pool.start(connection, self.method, self.path, self.fields, self.body,
                                              self.on_upstream, self.ticket.accepted)  # type: ignore[union-attr]

    def guarded(self, step, *args) -> None:  # type: ignore[no-untyped-def]
        """Run a step of the exchange; a bug in it answers 500 (or cuts a started stream) instead of killing the
        connection's protocol callbacks."""
        try:
            step(*args)
        except Exception as exc:
            self.crash(exc)

    # --- the replica's response -------------------------------------------------------------------------------
    def on_upstream(self, response: Response) -> None:
        """The replica's response changed (head, body, end, error): take it on."""
        if response is self.upstream and not self.over:
            self.guarded(self.progress, response)

    def progress(self, response: Response) -> None:
        if response.error is not None:
            self.failed(response.error)
            return
        if not response.head_done:
            return
        status = response.status
        replica: Replica = self.replica  # type: ignore[assignment]
        if status == 503:  # not served: read the reason, then retry elsewhere
            if response.complete:
                payload = response.take()
                self.end_attempt()
                replica.refused()
                self.reason = "unavailable"
                self.last_error = (503, payload, replica.name)
                self.attempt()
            return
        metrics = self.proxy.metrics
        if self.stream is None:
            sized = response.content_length is not None and not response.content_type.startswith("text/event-stream")
            if response.complete:  # a sized body, or a whole stream that came with its head: one write
                payload = response.take()
                if not sized and payload:
                    metrics.ttft(replica.name, time.perf_counter() - self.dispatched)
                self.proxy.count_done(replica, status)
                if response.first_body_at:
                    metrics.overhead_response.observe(time.perf_counter() - response.first_body_at)
                self.end_attempt()
                self.answer(Answer(status, payload, response_headers(response, replica, self.request_id)))
                return
            if sized or not response.first_body_at:  # a sized body goes out whole; a stream with its first piece
                return
            self.stream = self.request.start_stream(status, response_headers(response, replica, self.request_id))
            metrics.ttft(replica.name, time.perf_counter() - self.dispatched)
            metrics.overhead_response.observe(time.perf_counter() - response.first_body_at)
        chunk = response.take()
        if response.complete:  # settle everything first: the last write may start the client's next request
            self.proxy.count_done(replica, status)
            self.end_attempt()
            self.settle()
            self.stream.send(chunk, last=True)
        elif chunk:
            self.stream.send(chunk)
            if self.request.write_paused:  # the client lags: stop reading from the replica until it catches up
                response.pause()
                self.request.on_writable = self.writable

    def writable(self) -> None:
        """The client takes data again: read from the replica again."""
        self.request.on_writable = None
        if self.upstream is not None and not self.over:
            self.upstream.resume()

    def failed(self, error: UpstreamError) -> None:
        """The attempt failed: retry before the replica sent body bytes, else 502/504 (or cut a started stream)."""
        response = self.upstream
        if (response is not None and isinstance(error, UpstreamClosed) and response.reused
                and not response.received):
            # A kept-alive connection that the replica closed as we sent (its idle timeout): the request never
            # reached it, so it goes again on a fresh connection.
            response.release()
            self.upstream = None
            self.connect()
            return
        replica: Replica = self.replica  # type: ignore[assignment]
        proxy = self.proxy
        self.end_attempt()
        proxy.registry.failure(replica)
        if self.stream is not None:  # bytes reached the client: no retry; it sees a truncated response
            proxy.metrics.count(replica.name, "502")
            self.settle()
            self.request.abort()
        elif isinstance(error, ReadTimeout):  # it took the request, then went silent: no re-run
            self.answer(self.timed_out(replica))
        elif response is not None and response.first_body_at:
            proxy.metrics.count(replica.name, "502")
            self.answer(error_response(502, f"replica {replica.name} failed mid-response: {error}",
                                       code="upstream_failed",
                                       headers={REPLICA_HEADER: replica.name, REQUEST_ID_HEADER: self.request_id}))
        else:
            self.reason = "timeout" if isinstance(error, ConnectFailed) and error.timed_out else "connect"
            self.last_error = (502, error_body(502, f"replica {replica.name} unreachable: {error}",
                                               code="upstream_unreachable"), replica.name)
            self.attempt()

    # --- endings ----------------------------------------------------------------------------------------------
    def end_attempt(self) -> None:
        """Give the replica's connection back (or close it when the response is incomplete: the engine aborts the
        request) and drop the attempt's accounting."""
        if self.upstream is not None:
            self.upstream.release()
            self.upstream = None
        if self.ticket is not None:
            self.ticket.end()
            self.ticket = None

    def settle(self) -> None:
        self.over = True
        self.request.on_cancel = self.request.on_writable = None

    def answer(self, answer: Answer) -> None:
        self.settle()
        self.request.respond(answer)

    def cancel(self) -> None:
        """The client went away: close the replica's connection (the engine aborts the request)."""
        if self.over:
            return
        self.over = True
        if self.connecting is not None:
            self.connecting.cancel()
        self.end_attempt()
        self.proxy.metrics.count(self.replica.name if self.replica is not None else "none", "499")

    def crash(self, error: BaseException) -> None:
        """A bug in the exchange: 500, or cut a started stream."""
        log.error("proxying %s %s failed", self.request.method, self.path, exc_info=error)
        if self.over:
            return
        self.end_attempt()
        self.proxy.metrics.count(self.replica.name if self.replica is not None else "none", "500")
        if self.stream is not None:
            self.settle()
            self.request.abort()
        else:
            self.answer(error_response(500, "internal gateway error", code="internal_error",
                                       headers={REQUEST_ID_HEADER: self.request_id}))

    def replica_error(self) -> Answer:
        """The answer that reports the last replica's failure (status, payload, replica name), counted."""
        status, payload, name = self.last_error  # type: ignore[misc]
        self.proxy.metrics.count(name, str(status))
        return Answer(status, payload, [(REPLICA_HEADER, name), (REQUEST_ID_HEADER, self.request_id)],
                      content_type="application/json")

    def timed_out(self, replica: Replica) -> Answer:
        self.proxy.metrics.count(replica.name, "504")
        return error_response(504, f"replica {replica.name} sent nothing for {self.proxy.config.idle_timeout_s:g}s",
                              code="upstream_timeout",
                              headers={REPLICA_HEADER: replica.name, REQUEST_ID_HEADER: self.request_id})
