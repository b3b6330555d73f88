"""The gateway's routes: OpenAI routes proxied to the replicas, plus health, readiness and admin.

gateway/server.py serves the clients (aiohttp's server with the gateway's limits; a client disconnect cancels the
handler and so the upstream request); gateway/client.py's keep-alive pool talks to the engines.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from pypto_serving.contract import (
    PATH_HEALTH,
    PATH_METRICS,
    PATH_READY,
    REQUEST_ID_HEADER,
    ROUTING_HEADER,
    SESSION_HEADER,
)
from pypto_serving.gateway.client import UpstreamError
from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.discovery import Discovery
from pypto_serving.gateway.errors import error_response, json_response
from pypto_serving.gateway.load_watcher import LoadWatcher
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import POLICIES, Policy, make_policy
from pypto_serving.gateway.proxy import Proxy, new_request_id
from pypto_serving.gateway.replicas import Registry
from pypto_serving.gateway.request import RequestInfo, request_info
from pypto_serving.gateway.server import RequestRefused, read_body, refusal

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# The gateway's own endpoints in its OpenAPI document (the /v1 routes come from the engines').
GATEWAY_PATHS = {PATH_HEALTH: "The gateway process is alive.", PATH_READY: "200 while a replica can take traffic.",
                 "/replicas": "Each replica's address, state and last load.", PATH_METRICS: "Prometheus metrics."}
OPENAPI_TIMEOUT_S = 10.0
OPENAPI_MAX_BYTES = 4 * 1024 * 1024
ADMIN_PATHS = ("/replicas", PATH_METRICS)  # behind the API key when one is set
NO_KEY = "missing or invalid API key (Authorization: Bearer <key>)"


def parse_json(body: bytes) -> object:
    """A request body as JSON: orjson (the common case, ~5x faster), else the json module, which also takes what
    orjson refuses (NaN, Infinity) so that the gateway routes every body the engines accept; raises ValueError."""
    try:
        return orjson.loads(body)
    except ValueError:
        return json.loads(body)


def stamped(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """``response`` with the request's ``x-request-id`` (the client's, else a new one)."""
    response.headers[REQUEST_ID_HEADER] = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
    return response


class Gateway:
    """Everything one gateway holds: registry, discovery, load watcher, policies, proxy, metrics."""

    def __init__(self, config: GatewayConfig, discovery: Discovery) -> None:
        self.config = config
        self.limits = config.server_limits()
        self.metrics = GatewayMetrics()
        self.registry = Registry(config.breaker)
        self.registry.on_eject = lambda replica: self.metrics.ejections.labels(replica.name).inc()
        self.discovery = discovery
        self.loads = LoadWatcher(self.registry, self.metrics, config.poll_interval_s, config.poll_timeout_s,
                                 config.policy_config.stale_after_s, config.load_watch)
        self.proxy = Proxy(config, self.registry, self.metrics)
        self.metrics.loop.slot_queue = self.proxy.slots
        self.policies: dict[str, Policy] = {name: make_policy(name, config.policy_config) for name in POLICIES}
        self.default_policy = self.policies[config.policy]
        self._routes = self.routes()
        self._key = None if config.api_key is None else config.api_key.encode()

    async def start(self) -> None:
        """Start discovery and the load streams (or polling)."""
        await self.loads.start()
        await self.discovery.start(self.registry)

    async def stop(self) -> None:
        """Stop discovery and the load streams and close the upstream connections."""
        await self.discovery.stop()
        await self.loads.stop()
        await self.proxy.stop()

    # --- handlers ---------------------------------------------------------------------------------------------
    def authorized(self, request: web.BaseRequest) -> bool:
        """True when no API key is configured or the request carries it as a bearer token (compared as bytes:
        a header value that is not UTF-8 is simply a wrong key)."""
        if self._key is None:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), self._key)

    async def generate(self, request: web.BaseRequest) -> web.StreamResponse:
        """POST /v1/completions and /v1/chat/completions."""
        if not self.authorized(request):
            return self.reject(request, 401, NO_KEY, "invalid_api_key")
        try:
            body = await read_body(request, self.limits)
        except RequestRefused as refused:
            self.metrics.count("none", str(refused.status))
            return stamped(request, refusal(refused))
        received_at = time.perf_counter()
        try:
            parsed = parse_json(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self.reject(request, 400, "request body is not valid JSON", "invalid_json")
        if not isinstance(parsed, dict):
            return self.reject(request, 400, "request body must be a JSON object", "invalid_json")
        policy = self._policy(request)
        if policy is None:
            return self.reject(request, 400, f"unknown routing policy in {ROUTING_HEADER}; known: "
                                f"{', '.join(POLICIES)}", "unknown_policy", param=ROUTING_HEADER)
        info = request_info(parsed, request.headers.get(SESSION_HEADER), self.config.default_max_tokens,
                            self.config.chars_per_token)
        return await self.proxy.serve(request, request.path, body, info, policy, received_at)

    async def models(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /v1/models, answered by any ready replica."""
        if not self.authorized(request):
            return self.reject(request, 401, NO_KEY, "invalid_api_key")
        return await self.proxy.serve(request, "/v1/models", None, RequestInfo(), self.policies["least-requests"],
                                      time.perf_counter())

    async def openapi(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /openapi.json: what this gateway serves. The OpenAI routes are the engines' own (their document is
        fetched from a ready replica, so it always matches the engine version behind the gateway) without the
        engine-only endpoints, plus the gateway's endpoints."""
        document = None
        for replica in self.registry.eligible():
            try:
                status, payload = await self.proxy.client.get(replica.url + "/openapi.json", OPENAPI_TIMEOUT_S,
                                                              max_bytes=OPENAPI_MAX_BYTES)
                if status == 200:
                    document = json.loads(payload)
                    break
            except (UpstreamError, ValueError):
                continue
        if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
            return self.reject(request, 503, "no ready replica to describe the API", "no_replicas")
        paths = {p: ops for p, ops in document["paths"].items() if p.startswith("/v1/")}
        for path, summary in GATEWAY_PATHS.items():
            paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
        document["paths"] = paths
        document["info"] = {**(document.get("info") or {}), "title": "pypto-serving gateway"}
        if self.config.api_key is not None:
            document.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in paths.items():
                if path.startswith("/v1/") or path in ADMIN_PATHS:
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        return stamped(request, json_response(document))

    async def health(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /health: the gateway process is alive."""
        return stamped(request, json_response({"status": "ok"}))

    async def ready(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /ready: 200 while at least one replica can take traffic."""
        count = len(self.registry.eligible())
        return stamped(request, json_response({"ready": count > 0, "eligible_replicas": count},
                                              200 if count else 503))

    async def replicas(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /replicas (behind the API key): each replica's address, state, last load and the age of that load."""
        if not self.authorized(request):
            return self.reject(request, 401, NO_KEY, "invalid_api_key")
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
                          "load_source": r.load_source, "inflight": r.inflight, "unadmitted": r.unabsorbed,
                          "local_pending_tokens": r.unabsorbed_tokens,
                          "consecutive_failures": r.breaker.consecutive_failures})
        return stamped(request, json_response({"policy": self.default_policy.name, "queued": len(self.proxy.slots),
                                               "replicas": items}))

    async def metrics_text(self, request: web.BaseRequest) -> web.StreamResponse:
        """GET /metrics (Prometheus text, behind the API key)."""
        if not self.authorized(request):
            return self.reject(request, 401, NO_KEY, "invalid_api_key")
        counts: dict[str, int] = {}
        now = self.registry.clock()
        for replica in self.registry:
            state = replica.state(now)
            counts[state] = counts.get(state, 0) + 1
        for state in ("ready", "half-open", "ejected", "draining", "not-ready"):
            self.metrics.replicas.labels(state).set(counts.get(state, 0))
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = "text/plain; version=0.0.4"
        return stamped(request, response)

    def _policy(self, request: web.BaseRequest) -> Policy | None:
        name = request.headers.get(ROUTING_HEADER)
        return self.default_policy if not name else self.policies.get(name.strip().lower())

    def reject(self, request: web.BaseRequest, status: int, message: str, code: str,
               param: str | None = None) -> web.Response:
        """The gateway's own error answer to ``request``, counted and with the request id."""
        self.metrics.count("none", str(status))
        return stamped(request, error_response(status, message, code=code, param=param))  # type: ignore[return-value]

    # --- routing ----------------------------------------------------------------------------------------------
    def routes(self) -> dict[str, dict[str, Handler]]:
        """Path -> method -> handler (HEAD is served by a GET handler; aiohttp sends no body)."""
        return {"/v1/completions": {"POST": self.generate}, "/v1/chat/completions": {"POST": self.generate},
                "/v1/models": {"GET": self.models}, PATH_HEALTH: {"GET": self.health}, PATH_READY: {"GET": self.ready},
                "/replicas": {"GET": self.replicas}, PATH_METRICS: {"GET": self.metrics_text},
                "/openapi.json": {"GET": self.openapi}}

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Serve one request (404/405 envelopes for unknown routes and methods), as the HTTP server's handler.
        Every answer carries an ``x-request-id``: the client's, else a new one (the proxy sends it to the engines,
        which echo it)."""
        path = request.path
        methods = self._routes.get(path)
        if methods is None:
            return self.reject(request, 404, f"no route {path}", "not_found")
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            answer = self.reject(request, 405, f"{request.method} is not allowed on {path}", "method_not_allowed")
            answer.headers["Allow"] = ", ".join(methods)
            return answer
        return await handler(request)
