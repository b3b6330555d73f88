"""Routing decision time with 64 replicas: the gateway's own choose() (eligibility, saturation, policy), in-process.

Target: p99 <= 100 us for every policy. Run: `.venv/bin/python benchmarks/gateway_decision.py`.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_common import write_result
from pypto_serving.gateway.config import GatewayConfig
from pypto_serving.gateway.metrics import GatewayMetrics
from pypto_serving.gateway.policies import POLICIES, make_policy
from pypto_serving.gateway.proxy import Proxy
from pypto_serving.gateway.replicas import LoadReading, Registry
from pypto_serving.gateway.request import request_info

REPLICAS = 64
CALLS = 20000


def main() -> int:
    rng = random.Random(0)
    config = GatewayConfig(saturation_tokens=10**9)
    registry = Registry(config.breaker)
    now = registry.clock()
    for i in range(REPLICAS):
        replica = registry.upsert(f"demo-dp-{i}", f"http://127.0.{i // 250}.{i % 250 + 1}:8000")
        replica.update(LoadReading(running=rng.randint(0, 32), waiting=rng.randint(0, 8),
                                   pending_tokens=rng.randint(0, 50000), requested_at=now, received_at=now))
        for _ in range(rng.randint(0, 4)):
            replica.dispatch(rng.randint(10, 2000))
    proxy = Proxy(config, registry, GatewayMetrics())
    bodies = [{"prompt": f"system prompt {i % 50} " * 40 + f"question {i}", "max_tokens": 128, "user": f"u{i % 300}"}
              for i in range(1000)]
    infos = [request_info(b) for b in bodies]
    results: dict[str, dict[str, float]] = {}
    for name in POLICIES:
        policy = make_policy(name, config.policy_config)
        samples = []
        for i in range(CALLS):
            info = infos[i % len(infos)]
            start = time.perf_counter_ns()
            proxy.choose(policy, info, [])
            samples.append(time.perf_counter_ns() - start)
        samples.sort()
        results[name] = {"p50_us": samples[len(samples) // 2] / 1000,
                         "p99_us": samples[int(len(samples) * 0.99)] / 1000,
                         "mean_us": sum(samples) / len(samples) / 1000}
        print(f"{name:22s} p50 {results[name]['p50_us']:7.1f} us   p99 {results[name]['p99_us']:7.1f} us")
    worst = max(r["p99_us"] for r in results.values())
    print(f"worst p99 {worst:.1f} us (target <= 100 us) -> {'MET' if worst <= 100 else 'MISSED'}")
    write_result("gateway_decision", {"replicas": REPLICAS, "calls_per_policy": CALLS, "policies": results,
                                      "target_p99_us": 100, "worst_p99_us": worst, "met": worst <= 100})
    return 0


if __name__ == "__main__":
    sys.exit(main())
