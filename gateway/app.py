"""The gateway's HTTP app (aiohttp): OpenAI routes proxied to the replicas, plus health, readiness and admin.

aiohttp serves the clients (its C HTTP parser, handler cancellation so that a client disconnect reaches the
upstream request); gateway/upstream.py's lean keep-alive pool talks to the engines.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.discovery import Discovery
from pypto_serving.gateway.errors import error_response
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import POLICIES, Policy, make_policy
from pypto_serving.gateway.poller import Poller
from pypto_serving.gateway.proxy import REQUEST_ID_HEADER, Proxy, new_request_id
from pypto_serving.gateway.replicas import Registry
from pypto_serving.gateway.request import RequestInfo, request_info
from pypto_serving.gateway.upstream import UpstreamError

ROUTING_HEADER = "x-pypto-routing"
# The gateway's own endpoints in its OpenAPI document (the /v1 routes come from the engines').
GATEWAY_PATHS = {"/health": "The gateway process is alive.", "/ready": "200 while a replica can take traffic.",
                 "/replicas": "Each replica's address, state and last load.", "/metrics": "Prometheus metrics."}
SESSION_HEADER = "x-session-id"
OPENAPI_TIMEOUT_S = 10.0


class Gateway:
    """Everything one gateway holds: registry, discovery, poller, policies, proxy, metrics."""

    def __init__(self, config: GatewayConfig, discovery: Discovery) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.registry = Registry(config.breaker)
        self.registry.on_eject = lambda replica: self.metrics.ejections.labels(replica.name).inc()
        self.discovery = discovery
        self.poller = Poller(self.registry, self.metrics, config.poll_interval_s, config.poll_timeout_s)
        self.proxy = Proxy(config, self.registry, self.metrics)
        self.policies: dict[str, Policy] = {name: make_policy(name, config.policy_config) for name in POLICIES}
        self.default_policy = self.policies[config.policy]

    async def start(self) -> None:
        """Open sessions, start discovery and polling (first readings are awaited briefly)."""
        await self.poller.start()
        await self.discovery.start(self.registry)

    async def stop(self) -> None:
        """Stop discovery and polling and close sessions."""
        await self.discovery.stop()
        await self.poller.stop()
        self.proxy.stop()

    # --- handlers ---------------------------------------------------------------------------------------------
    def authorized(self, request: web.Request) -> bool:
        """True when no API key is configured or the request carries it as a bearer token."""
        if self.config.api_key is None:
            return True
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.config.api_key.encode())

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions and /v1/chat/completions."""
        if not self.authorized(request):
            return self._reject(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return self._reject(413, f"request body over {self.config.max_body_bytes} bytes", "body_too_large")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, f"request body over {self.config.max_body_bytes} bytes", "body_too_large")
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._reject(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(parsed, dict):
            return self._reject(400, "request body must be a JSON object", "invalid_json")
        policy = self._policy(request)
        if policy is None:
            return self._reject(400, f"unknown routing policy in {ROUTING_HEADER}; known: {', '.join(POLICIES)}",
                                "unknown_policy", param=ROUTING_HEADER)
        info = request_info(parsed, request.headers.get(SESSION_HEADER), self.config.default_max_tokens,
                            self.config.chars_per_token)
        return await self.proxy.handle(request, request.path, body, info, policy)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models, answered by any ready replica."""
        if not self.authorized(request):
            return self._reject(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
        return await self.proxy.handle(request, "/v1/models", None, RequestInfo(), self.policies["least-requests"])

    async def openapi(self, request: web.Request) -> web.Response:
        """GET /openapi.json: what this gateway serves. The OpenAI routes are the engines' own (their document is
        fetched from a ready replica, so it always matches the engine version behind the gateway) without the
        engine-only endpoints, plus the gateway's endpoints."""
        document = None
        for replica in self.registry.eligible():
            try:
                status, payload = await self.proxy.pool.get(replica.url, "/openapi.json", OPENAPI_TIMEOUT_S)
                if status == 200:
                    document = json.loads(payload)
                    break
            except (UpstreamError, ValueError):
                continue
        if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
            return self._reject(503, "no ready replica to describe the API", "no_replicas")
        paths = {p: ops for p, ops in document["paths"].items() if p.startswith("/v1/")}
        for path, summary in GATEWAY_PATHS.items():
            paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
        document["paths"] = paths
        document["info"] = {**(document.get("info") or {}), "title": "pypto-serving gateway"}
        if self.config.api_key is not None:
            document.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in paths.items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        return web.json_response(document)

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: the gateway process is alive."""
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """GET /ready: 200 while at least one replica can take traffic."""
        count = len(self.registry.eligible())
        return web.json_response({"ready": count > 0, "eligible_replicas": count}, status=200 if count else 503)

    async def replicas(self, request: web.Request) -> web.Response:
        """GET /replicas: each replica's address, state, last load and the age of that load."""
        now = self.registry.clock()
        items = []
        for r in sorted(self.registry, key=lambda r: r.name):
            load = None
            if r.reading is not None:
                load = {"running": r.reading.running, "waiting": r.reading.waiting,
                        "pending_tokens": r.reading.pending_tokens, "kv_cache_usage": r.reading.kv_cache_usage,
                        "draining": r.reading.draining}
            items.append({"name": r.name, "address": r.url, "state": r.state(now), "load": load,
                          "load_age_s": None if r.reading is None else round(now - r.reading.received_at, 4),
                          "inflight": r.inflight, "local_pending_tokens": r.unabsorbed_tokens,
                          "consecutive_failures": r.breaker.consecutive_failures})
        return web.json_response({"policy": self.default_policy.name, "replicas": items})

    async def metrics_text(self, request: web.Request) -> web.Response:
        """GET /metrics (Prometheus text)."""
        counts: dict[str, int] = {}
        now = self.registry.clock()
        for replica in self.registry:
            state = replica.state(now)
            counts[state] = counts.get(state, 0) + 1
        for state in ("ready", "half-open", "ejected", "draining", "not-ready"):
            self.metrics.replicas.labels(state).set(counts.get(state, 0))
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    def _policy(self, request: web.Request) -> Policy | None:
        name = request.headers.get(ROUTING_HEADER)
        return self.default_policy if not name else self.policies.get(name.strip().lower())

    def _reject(self, status: int, message: str, code: str, param: str | None = None) -> web.Response:
        self.metrics.requests.labels("none", str(status)).inc()
        return error_response(status, message, code=code, param=param)


GATEWAY_KEY = web.AppKey("gateway", Gateway)


@web.middleware
async def envelope_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """Turn aiohttp's own HTTP errors (404, 405, 413) into OpenAI error envelopes, and give every answer the
    gateway makes itself (rejections included) an ``x-request-id``: the client's, else a new one."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason or "error", code=exc.reason.lower().replace(" ", "_"))
    if not response.prepared and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
    return response


def create_app(config: GatewayConfig, discovery: Discovery) -> web.Application:
    """The aiohttp application of one gateway (start/stop hooked to the app's lifecycle)."""
    gateway = Gateway(config, discovery)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[envelope_errors],
                          handler_args={"max_field_size": 65536})
    app[GATEWAY_KEY] = gateway
    app.router.add_post("/v1/completions", gateway.generate)
    app.router.add_post("/v1/chat/completions", gateway.generate)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/ready", gateway.ready)
    app.router.add_get("/replicas", gateway.replicas)
    app.router.add_get("/metrics", gateway.metrics_text)
    app.router.add_get("/openapi.json", gateway.openapi)

    async def lifecycle(app: web.Application):
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
