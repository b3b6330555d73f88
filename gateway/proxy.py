"""Proxying one request: route, dispatch, retry before the first byte, relay (streaming unbuffered), account.

Flow of a request (see docs/architecture.md, "Gateway"):
1. candidates = eligible replicas (discovered ready, not draining, breaker closed or half-open) not tried yet;
   none at all -> 503; every candidate at the saturation threshold -> 429 with Retry-After;
2. the policy picks one (timed into the routing-decision histogram); its estimated tokens are dispatched;
3. connection failure/timeout before a response, or a 503 answer -> try another replica (at most
   ``max_retries`` more); once bytes went to the client nothing is retried;
4. the response is relayed as it arrives (each upstream chunk written through at once); a client disconnect
   cancels the handler and closes the upstream connection, which makes the engine abort the request.
"""

from __future__ import annotations

import asyncio
import random
import time

from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.errors import error_body, error_response
from pypto_serving.gateway.http_server import Answer, Request
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import Policy
from pypto_serving.gateway.replicas import Registry, Replica
from pypto_serving.gateway.request import RequestInfo
from pypto_serving.gateway.upstream import ConnectFailed, ReadTimeout, Response, UpstreamError, UpstreamPool

REPLICA_HEADER = "x-pypto-replica"
REQUEST_ID_HEADER = "x-request-id"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length"})


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
        candidates = self.registry.eligible(exclude=tried)
        if not candidates:
            return error_response(503, "no ready engine replica to serve the request" if not tried else
                                  "every ready replica failed this request", code="no_replicas")
        now = self.registry.clock()
        threshold = self.config.saturation_tokens
        if threshold > 0 and info.tokens > 0:
            stale = self.config.policy_config.stale_after_s
            candidates = [r for r in candidates if r.pending_tokens(stale, now) < threshold]
            if not candidates:
                return error_response(429, "every replica is saturated; retry later", code="saturated",
                                      headers={"Retry-After": str(self.config.retry_after_s)})
        replica = policy.select(candidates, info, now)
        self.metrics.decision.observe(time.perf_counter() - started)
        return replica

    # --- proxying ---------------------------------------------------------------------------------------------
    async def handle(self, request: Request, path: str, body: bytes | None, info: RequestInfo,
                     policy: Policy) -> Answer | None:
        """Serve one request with retries: an answer to send, or None once it was streamed to the client."""
        tried: list[str] = []
        headers, request_id = forward_headers(request)
        last_error: tuple[int, bytes, str] | None = None
        reason = ""
        for attempt in range(self.config.max_retries + 1):
            chosen = self.choose(policy, info, tried)
            if isinstance(chosen, Answer):
                if last_error is not None and chosen.status == 503:  # report what the replicas said
                    return self._replica_error(last_error, request_id)
                self.metrics.count(last_error[2] if last_error else "none", str(chosen.status))
                chosen.headers.append((REQUEST_ID_HEADER, request_id))
                return chosen
            replica = chosen
            tried.append(replica.name)
            if attempt:
                self.metrics.retries.labels(reason).inc()
            ticket = replica.dispatch(info.tokens, info.stream)
            dispatched = time.perf_counter()
            if not attempt:
                self.metrics.overhead_request.observe(dispatched - request.received_at)
            try:
                # the engine accepted the request with its response head (accounting learns at once); the relay
                # starts with the first body piece
                upstream = await self.pool.request(request.method, replica.url, path, headers, body,
                                                   on_head=ticket.accepted, until_body=True)
            except UpstreamError as exc:
                ticket.end()
                self.registry.failure(replica)
                if isinstance(exc, ReadTimeout):  # it took the request, then went silent: no re-run
                    return self._timed_out(replica, request_id)
                reason = "timeout" if isinstance(exc, ConnectFailed) and exc.timed_out else "connect"
                last_error = (502, error_body(502, f"replica {replica.name} unreachable: {exc}",
                                              code="upstream_unreachable"), replica.name)
                continue
            except asyncio.CancelledError:  # the client disconnected while the replica worked on it
                ticket.end()
                self.metrics.count(replica.name, "499")
                raise
            except BaseException:
                ticket.end()
                raise
            if upstream.status == 503:
                try:
                    payload = await upstream.read()
                except UpstreamError:
                    payload = error_body(503, f"replica {replica.name} unavailable", code="unavailable")
                finally:
                    upstream.release()
                    ticket.end()
                replica.refused()
                reason = "unavailable"
                last_error = (503, payload, replica.name)
                continue
            try:
                return await self.relay(request, upstream, replica, dispatched, request_id)
            finally:
                ticket.end()
        return self._replica_error(last_error, request_id)  # type: ignore[arg-type]  # the loop ran at least once

    def _replica_error(self, last_error: tuple[int, bytes, str], request_id: str) -> Answer:
        """The answer that reports the last replica's failure (status, payload, replica name), counted."""
        status, payload, name = last_error
        self.metrics.count(name, str(status))
        return Answer(status, payload, [(REPLICA_HEADER, name), (REQUEST_ID_HEADER, request_id)],
                      content_type="application/json")

    async def relay(self, request: Request, upstream: Response, replica: Replica, dispatched: float,
                    request_id: str) -> Answer | None:
        """Relay an accepted upstream response to the client; never retried from here on."""
        status = upstream.status
        streamed = False
        try:
            sized = upstream.content_length is not None and not upstream.content_type.startswith("text/event-stream")
            if sized or upstream.complete:  # a sized body, or a whole stream that came with its head: one write
                payload = await upstream.read()
                if not sized and payload:
                    self.metrics.ttft(replica.name, time.perf_counter() - dispatched)
                self._done(replica, status)
                if upstream.first_body_at:
                    self.metrics.overhead_response.observe(time.perf_counter() - upstream.first_body_at)
                return Answer(status, payload, response_headers(upstream, replica, request_id))
            # streamed: the head leaves with the first piece
            stream = request.start_stream(status, response_headers(upstream, replica, request_id))
            while (chunk := await upstream.next_chunk()) is not None:
                if not streamed:
                    self.metrics.ttft(replica.name, time.perf_counter() - dispatched)
                try:  # the last piece carries the end of the body in the same write
                    await stream.write(chunk, last=upstream.complete)
                except ConnectionError:  # the client went away: closing upstream (finally) cancels the request
                    self.metrics.count(replica.name, "499")
                    return None
                if not streamed:
                    streamed = True
                    self.metrics.overhead_response.observe(time.perf_counter() - upstream.first_body_at)
            await stream.end()
            self._done(replica, status)
            return None
        except UpstreamError as exc:
            self.registry.failure(replica)
            if not streamed and isinstance(exc, ReadTimeout):
                return self._timed_out(replica, request_id)
            self.metrics.count(replica.name, "502")
            if not streamed:
                return error_response(502, f"replica {replica.name} failed mid-response: {exc}",
                                      code="upstream_failed",
                                      headers={REPLICA_HEADER: replica.name, REQUEST_ID_HEADER: request_id})
            # Bytes reached the client: no retry. Cut its connection so that it sees a truncated response.
            request.abort()
            return None
        except asyncio.CancelledError:  # the client disconnected
            self.metrics.count(replica.name, "499")
            raise
        finally:
            upstream.release()  # a complete response gives its connection back to the pool; else it closes

    def _timed_out(self, replica: Replica, request_id: str) -> Answer:
        self.metrics.count(replica.name, "504")
        return error_response(504, f"replica {replica.name} sent nothing for {self.config.idle_timeout_s:g}s",
                              code="upstream_timeout",
                              headers={REPLICA_HEADER: replica.name, REQUEST_ID_HEADER: request_id})

    def _done(self, replica: Replica, status: int) -> None:
        self.metrics.count(replica.name, str(status))
        if status < 500:
            self.registry.success(replica)
        else:
            self.registry.failure(replica)
