"""Every tunable of the gateway in one place (filled from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pypto_serving.gateway.breaker import BreakerConfig
from pypto_serving.gateway.policies import DEFAULT_POLICY, PolicyConfig


@dataclass
class GatewayConfig:
    """Gateway settings; defaults are the documented CLI defaults."""

    policy: str = DEFAULT_POLICY
    api_key: str | None = None  # bearer token required on /v1/* when set
    poll_interval_s: float = 0.05  # /load polling period per replica
    poll_timeout_s: float = 1.0
    saturation_tokens: int = 0  # every candidate at or above this many pending tokens -> 429 (0: never)
    retry_after_s: int = 1  # Retry-After of a 429
    max_retries: int = 2  # further replicas tried after a connection failure or a 503 before any byte
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0  # longest silence of an upstream response (between two chunks)
    max_body_bytes: int = 16 * 1024 * 1024
    default_max_tokens: int = 256  # accounting estimate when a request sets no max_tokens
    chars_per_token: float = 4.0  # prompt-length estimate (the gateway has no tokenizer)
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
