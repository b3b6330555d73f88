"""Every tunable of the gateway in one place (filled from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pypto_serving.gateway.breaker import BreakerConfig
from pypto_serving.gateway.policies import DEFAULT_POLICY, PolicyConfig
from pypto_serving.gateway.server import ServerLimits


@dataclass
class GatewayConfig:
    """Gateway settings; defaults are the documented CLI defaults."""

    policy: str = DEFAULT_POLICY
    api_key: str | None = None  # bearer token required on /v1/* when set
    load_watch: bool = True  # each engine pushes its load (GET /load?watch=1); False: poll every engine
    poll_interval_s: float = 0.05  # /load polling period per replica (engines that do not push)
    poll_timeout_s: float = 1.0
    saturation_tokens: int = 0  # every candidate at or above this many pending tokens -> 429 (0: never)
    retry_after_s: int = 1  # Retry-After of a 429
    queue_wait_s: float = 30.0  # longest wait at the gateway for a free batch slot (0: no queue, dispatch at once)
    max_queued: int = 1024  # requests waiting at the gateway; more go straight to an engine's queue
    engine_queue_depth: int = 0  # requests a replica may queue beyond its batch slots before the gateway holds
    max_retries: int = 2  # further replicas tried after a connection failure or a 503 before any byte
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0  # longest silence of an upstream response (between two chunks)
    max_body_bytes: int = 16 * 1024 * 1024  # a client's request body (413 above)
    max_upstream_body_bytes: int = 256 * 1024 * 1024  # a replica's answer (502 above; a stream is cut)
    keepalive_timeout_s: float = 30.0  # an idle client connection, or one whose request head is incomplete
    body_timeout_s: float = 30.0  # a request body must arrive within this ...
    body_min_rate: int = 64 * 1024  # ... plus one second per this many bytes (408 otherwise)
    send_timeout_s: float = 60.0  # a client that takes nothing for this long while written to is cut
    max_connections: int = 4096  # client connections; one more gets a 503 and is closed
    max_headers: int = 100  # header lines of a request (431 above)
    max_header_bytes: int = 8190  # the request line and each header line (431 above)
    shutdown_grace_s: float = 25.0  # after SIGTERM, answers in flight may finish for this long (the pod has 30 s)
    default_max_tokens: int = 256  # accounting estimate when a request sets no max_tokens
    chars_per_token: float = 4.0  # prompt-length estimate (the gateway has no tokenizer)
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def server_limits(self) -> ServerLimits:
        """What one client may cost the gateway, for its HTTP server."""
        return ServerLimits(max_body_bytes=self.max_body_bytes, max_headers=self.max_headers,
                            max_field_bytes=self.max_header_bytes, keepalive_s=self.keepalive_timeout_s,
                            body_timeout_s=self.body_timeout_s, body_min_rate=self.body_min_rate,
                            send_timeout_s=self.send_timeout_s, max_connections=self.max_connections)
