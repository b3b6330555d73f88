"""Benchmark 2, routing quality: 4 engine replicas, a heavy-tailed workload (most outputs short, some very long) at
a fixed Poisson arrival rate, through the gateway's policies, nginx round-robin and the routers people pick instead
(smg least_load / cache_aware / prefix_hash, vllm-router power_of_two / cache_aware, sglang-router cache_aware, from
a cached venv: see --peers-venv). Same requests, same arrival times, same engines; every router in turn per round
(the order rotates), at each load factor, for --rounds rounds; medians over rounds with the per-round values.

Issue 20's target: TTFT p90 and p99 of the default policy lower than every peer policy's in the median over rounds,
with equal throughput.

Target: p99 TTFT at least 2x lower with least-pending-tokens than with nginx round-robin, with equal or higher
throughput. The rate is 0.6 of the output throughput measured with every batch slot busy. Measured on 2026-11-21
(p99 TTFT nginx / least-pending-tokens, 480 requests): 21x at 0.6, 1.65x at 0.7, 0.98x at 0.8. The 15% long
requests carry ~83% of the tokens, and with 2 slots per engine (8 in all) they hold ~5 of the 8 slots on average
at 0.7: ever more often all 8, and then a short request waits wherever it goes. A router that commits it at once
makes it wait behind the running requests of one engine; the gateway holds it instead until a slot frees on any
engine (gateway/slot_queue.py). The row "gateway least-pending-tokens (no queue)" is the same gateway with
`--queue-wait 0`, which commits every request at once as the peers do.
Run: `.venv/bin/python benchmarks/gateway_routing.py [--rounds 3] [--load-factors 0.6,0.8]`; writes
docs/benchmarks/gateway_routing.json (after every run, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.gateway_common import (
    PEERS_VENV,
    Nginx,
    PeerRouter,
    gateway_command,
    model_name,
    peer_commands,
    start_engines,
    write_result,
)
from pypto_serving.engine.bench import BenchRequest, run_benchmark
from tests.support.common import wait_for
from tests.support.models import tiny_model_dir


def heavy_tailed(count: int, long_share: float, seed: int) -> list[BenchRequest]:
    """Mostly short outputs (4-32 tokens), a ``long_share`` of very long ones (400-600 tokens)."""
    rng = random.Random(seed)
    words = ("route", "token", "cache", "engine", "batch", "replica", "gateway", "prefix")
    out = []
    for _ in range(count):
        prompt_len = rng.randint(16, 48)
        prompt = " ".join(rng.choice(words) for _ in range(prompt_len))
        output = rng.randint(400, 600) if rng.random() < long_share else rng.randint(4, 32)
        out.append(BenchRequest(prompt, prompt_len, output))
    return out


GATEWAY_POLICIES = ("least-pending-tokens", "least-requests")
RESULT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "gateway_routing.json"


def idle(urls: list[str]) -> bool:
    return all(httpx.get(u + "/load", timeout=5).json()["running"] == 0 for u in urls)


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds, per router and load factor, with the per-round values."""
    out: dict = {}
    for run in runs:
        out.setdefault(str(run["load_factor"]), {}).setdefault(run["router"], []).append(run)
    table: dict = {}
    for factor, routers in out.items():
        table[factor] = {}
        for router, rows in routers.items():
            table[factor][router] = {
                "rounds": len(rows),
                **{f"ttft_{q}_ms": round(statistics.median(r["ttft_ms"][q] for r in rows), 1)
                   for q in ("p50", "p90", "p99")},
                "output_tok_s": round(statistics.median(r["output_throughput"] for r in rows), 1),
                "per_round_ttft_p90_ms": [round(r["ttft_ms"]["p90"], 1) for r in rows],
                "per_round_ttft_p99_ms": [round(r["ttft_ms"]["p99"], 1) for r in rows],
                "errors": sum(r["errors"] for r in rows)}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=480, help="p99 is then the 5th-slowest request of a run")
    p.add_argument("--load-factors", default="0.6,0.8", help="arrival rates as shares of the calibrated capacity")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds (3 keeps this script near 1 h on 2 cores; issue 20 asks for 5: --rounds 5)")
    p.add_argument("--long-share", type=float, default=0.15)
    p.add_argument("--max-num-seqs", type=int, default=2, help="engine batch slots (a long request holds one)")
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV,
                   help="venv with smg, vllm-router and sglang-router from PyPI (`make bench` makes it)")
    p.add_argument("--only", default="", help="comma-separated router names to run (default: all)")
    p.add_argument("--append", action="store_true", help="add --rounds more rounds to the recorded result, at its "
                   "calibrated rates (same requests, the next arrival seeds)")
    args = p.parse_args(argv)
    factors = [float(f) for f in args.load_factors.split(",")]
    work = Path(tempfile.mkdtemp(prefix="routing-"))
    engines = start_engines(tiny_model_dir("qwen3"), 4, ["--max-num-seqs", str(args.max_num_seqs),
                                                        "--max-model-len", "1024"], work)
    urls = [e.url for e in engines]
    nginx = Nginx(urls)
    try:
        model = model_name(urls[0])
        requests = heavy_tailed(args.requests, args.long_share, seed=1)
        # Every batch slot busy for three waves, measured twice; the slower measure counts, so that a fast moment
        # of this shared machine does not set a rate that overloads every router.
        slots = len(urls) * args.max_num_seqs
        burst = [BenchRequest("calibrate " * 32, 32, 200) for _ in range(3 * slots)]
        run_benchmark(burst, base_url=nginx.url, model=model, progress=False)  # warm-up: first steps are slower
        mean_output = sum(r.output_len for r in requests) / len(requests)
        recorded = json.loads(RESULT.read_text()) if args.append and RESULT.exists() else None
        if recorded is not None:
            capacity = recorded["calibration"]["capacity_tok_s"]
            rates = {float(f): r for f, r in recorded["rates"].items()}
            factors = list(rates)
        else:
            capacity = min(run_benchmark(burst, base_url=nginx.url, model=model, progress=False)
                           ["output_throughput"] for _ in range(2))
            rates = {f: round(f * capacity / mean_output, 2) for f in factors}
        print(f"calibrated: {capacity:.0f} output tok/s with every slot busy, mean output {mean_output:.0f} tokens "
              f"-> rates {rates}", flush=True)
        # Every router, ours included, is up only for its own runs (nginx, which does not watch the engines, stays)
        routers: dict[str, list[str] | tuple[str, dict]] = {
            f"gateway {policy}": gateway_command(urls, "--policy", policy) for policy in GATEWAY_POLICIES}
        routers[f"gateway {GATEWAY_POLICIES[0]} (no queue)"] = gateway_command(urls, "--queue-wait", "0")
        routers["nginx round-robin"] = (nginx.url, {})
        routers.update(peer_commands(args.peers_venv, urls))
        if args.only:
            routers = {k: v for k, v in routers.items() if k in args.only.split(",")}
        runs: list[dict] = list(recorded["runs"]) if recorded is not None else []
        first = 1 + max((run["round"] for run in runs), default=-1)
        names = list(routers)
        for round_ in range(first, first + args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                target = routers[name]
                peer = None if isinstance(target, tuple) else PeerRouter(target, work / f"{name.replace(' ', '-')}.log")
                url, headers = (peer.url, {}) if peer is not None else target
                try:
                    for factor in factors:
                        wait_for(lambda: idle(urls), 120, "engines idle between runs")
                        r = run_benchmark(requests, base_url=url, model=model, request_rate=rates[factor],
                                          headers=headers, seed=7 + round_, progress=False)
                        runs.append({"router": name, "round": round_, "load_factor": factor, "ttft_ms": r["ttft_ms"],
                                     "e2e_ms": r["e2e_ms"], "errors": r["errors"],
                                     "output_throughput": r["output_throughput"]})
                        print(f"round {round_} lf {factor} {name:28s} TTFT p50 {r['ttft_ms']['p50']:7.1f} p90 "
                              f"{r['ttft_ms']['p90']:7.1f} p99 {r['ttft_ms']['p99']:7.1f} ms | "
                              f"{r['output_throughput']:6.1f} tok/s | errors {r['errors']}", flush=True)
                finally:
                    if peer is not None:
                        peer.stop()
                write_result("gateway_routing", {
                    "replicas": 4, "requests": args.requests, "rates": rates, "long_share": args.long_share,
                    "max_num_seqs": args.max_num_seqs, "calibration": {"capacity_tok_s": round(capacity, 1),
                                                                       "mean_output_tokens": round(mean_output, 1)},
                    "rounds_done": round_ + (name == order[-1]), "appended": recorded is not None,
                    "summary": summarize(runs), "runs": runs})
        table = summarize(runs)
        ours = "gateway least-pending-tokens"
        for factor, rows in table.items():
            print(f"\nload factor {factor}: median over rounds")
            for name, row in sorted(rows.items(), key=lambda kv: kv[1]["ttft_p99_ms"]):
                print(f"  {name:28s} TTFT p50 {row['ttft_p50_ms']:7.1f} p90 {row['ttft_p90_ms']:7.1f} p99 "
                      f"{row['ttft_p99_ms']:7.1f} ms | {row['output_tok_s']:6.1f} tok/s")
            peers = [row for name, row in rows.items() if not name.startswith("gateway")]
            if ours in rows and peers:
                wins = all(rows[ours][f"ttft_{q}_ms"] < min(r[f"ttft_{q}_ms"] for r in peers) for q in ("p90", "p99"))
                print(f"  {ours}: p90 and p99 below every peer's -> {'MET' if wins else 'MISSED'}")
    finally:
        nginx.stop()
        for engine in engines:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
