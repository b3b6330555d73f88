"""Benchmark 1, proxy overhead: direct to one engine vs through the gateway vs through nginx (round-robin reverse
proxy), max_tokens=1, at concurrency 1 and 32, all against the same real engine in one run.

The paths are measured *mixed at random*: N workers take requests from one shuffled list in which every path
appears equally often, so every path sees the same engine load and the same machine noise (this machine's 2 cores
are shared), and no path always follows another one (a fixed cycle made a path pay for the path before it: a
request sent right after a slower one arrives later in the engine's batch). A control path, `direct-again`, goes
straight to the engine like `direct`: its difference to `direct` is the measurement's own noise at that
concurrency. This repeats for ``--rounds`` rounds (fresh shuffle and connections each); percentiles are taken over
all rounds' samples, and each round's differences are kept to show their spread.
Reported: end-to-end latency percentiles per path and the difference to direct. Targets: the gateway adds
<= 1 ms p50 and <= 5 ms p99. Also reported, per concurrency: the time requests spent inside the gateway itself
(its `pypto_gateway_overhead_seconds` histogram: whole request received -> upstream request, first upstream body
bytes -> written to the client), which the end-to-end difference contains but also amplifies: a request that
reaches the engine a little later can miss the batch of the engine step that is starting.
Run: `.venv/bin/python benchmarks/gateway_overhead.py [--requests N] [--rounds R]`; writes
docs/benchmarks/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.gateway_common import Nginx, cpu_seconds, gateway, model_name, start_engines, write_result
from pypto_serving.engine.bench import BenchConfig, BenchRequest, percentiles, send_request
from tests.support.models import tiny_model_dir

REQUEST = BenchRequest("measure the proxy overhead " * 4, 24, 1)
CONCURRENCIES = (1, 32)
PROXIES = ("gateway", "nginx", "direct-again")  # compared with "direct"; direct-again is the noise control


async def mixed(targets: dict[str, str], model: str, concurrency: int, per_target: int,
                seed: int) -> dict[str, list[float]]:
    """``concurrency`` workers sending ``per_target`` requests to every target in one shuffled order;
    returns e2e seconds per target."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {name: httpx.AsyncClient(base_url=url, limits=limits, timeout=60) for name, url in targets.items()}
    configs = {name: BenchConfig(base_url=url, model=model, progress=False) for name, url in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    order = list(targets) * per_target
    random.Random(seed).shuffle(order)
    queue = iter(order)

    async def worker() -> None:
        for name in queue:
            result = await send_request(clients[name], configs[name], REQUEST)
            if not result.ok:
                raise RuntimeError(f"{name}: {result.error}")
            samples[name].append(result.e2e_s)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for client in clients.values():
            await client.aclose()
    return samples


def overhead_buckets(url: str) -> dict[str, list[tuple[float, float]]]:
    """The gateway's overhead histogram: leg -> cumulative (upper bound, count) buckets."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "pypto_gateway_overhead_seconds_bucket":
                out.setdefault(sample.labels["leg"], []).append((float(sample.labels["le"]), sample.value))
    return out


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """Quantile ``q`` (ms) of the observations between two snapshots, interpolated within its bucket."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in counts:
        if count >= rank:
            upper = le if le != float("inf") else lower
            return 1e3 * (lower + (upper - lower) * (rank - below) / max(count - below, 1e-9))
        lower, below = le, count
    return 1e3 * lower


def differences(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """p50 and p99 of every compared path minus direct's, per concurrency."""
    return {path: {conc: {q: table[path][conc][q] - table["direct"][conc][q] for q in ("p50", "p99")}
                   for conc in table["direct"]} for path in PROXIES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=1280, help="requests per path, concurrency and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each a fresh shuffle and fresh connections)")
    args = p.parse_args(argv)
    (engine,) = start_engines(tiny_model_dir("qwen3"), 1, ["--max-num-seqs", "64", "--cpu-threads", "1"],
                              Path(tempfile.mkdtemp()))
    gw = gateway("--endpoints", engine.url)
    nginx = Nginx([engine.url])
    try:
        model = model_name(engine.url)
        targets = {"direct": engine.url, "direct-again": engine.url, "gateway": gw.url, "nginx": nginx.url}
        asyncio.run(mixed(targets, model, 4, 100, seed=-1))  # warm-up
        pooled: dict[str, dict[str, list[float]]] = {name: {f"c{c}": [] for c in CONCURRENCIES} for name in targets}
        rounds = []
        pids = {"gateway": gw.proc.pid, "nginx": nginx.proc.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        inside: dict[str, dict[str, list[float]]] = {f"c{c}": {} for c in CONCURRENCIES}
        for round_no in range(args.rounds):
            table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in targets}
            for concurrency in CONCURRENCIES:
                before = overhead_buckets(gw.url)
                samples = asyncio.run(mixed(targets, model, concurrency, args.requests, seed=round_no))
                after = overhead_buckets(gw.url)
                for leg in after:
                    for q in ("p50", "p99"):
                        inside[f"c{concurrency}"].setdefault(f"{leg} {q}", []).append(
                            bucket_quantile(before.get(leg, [(le, 0.0) for le, _ in after[leg]]), after[leg],
                                            0.5 if q == "p50" else 0.99))
                for name, values in samples.items():
                    table[name][f"c{concurrency}"] = percentiles(values)
                    pooled[name][f"c{concurrency}"] += values
            rounds.append(differences(table))
            row = rounds[-1]["gateway"]
            print(f"round {round_no + 1}/{args.rounds}: gateway adds c1 p50 {row['c1']['p50']:+.2f} ms, "
                  f"c32 p50 {row['c32']['p50']:+.2f} ms, p99 {row['c32']['p99']:+.2f} ms", flush=True)
        table = {name: {conc: percentiles(values) for conc, values in by_conc.items()}
                 for name, by_conc in pooled.items()}
        print(f"{'e2e ms':13s} {'c1 p50':>8s} {'c1 p99':>8s} {'c32 p50':>8s} {'c32 p99':>8s}")
        for name, row in table.items():
            print(f"{name:13s} {row['c1']['p50']:8.2f} {row['c1']['p99']:8.2f} {row['c32']['p50']:8.2f} "
                  f"{row['c32']['p99']:8.2f}")
        requests = args.requests * args.rounds * len(CONCURRENCIES)
        cpu_us = {name: (cpu_seconds(pid) - cpu_before[name]) / requests * 1e6 for name, pid in pids.items()}
        print(f"proxy CPU per request (noise-free cost): gateway {cpu_us['gateway']:.0f} us, "
              f"nginx {cpu_us['nginx']:.0f} us; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        inside_ms = {conc: {k: max(v) for k, v in legs.items()} for conc, legs in inside.items()}
        for conc, legs in inside_ms.items():
            print(f"inside the gateway at {conc} (worst round): "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in legs.items()))
        added = differences(table)
        for proxy, row in added.items():
            print(f"{proxy} adds: c1 p50 {row['c1']['p50']:+.2f} ms, p99 {row['c1']['p99']:+.2f} ms; "
                  f"c32 p50 {row['c32']['p50']:+.2f} ms, p99 {row['c32']['p99']:+.2f} ms")
        met = all(added["gateway"][c]["p50"] <= 1.0 and added["gateway"][c]["p99"] <= 5.0 for c in ("c1", "c32"))
        print(f"target gateway <= +1 ms p50 and <= +5 ms p99: {'MET' if met else 'MISSED'} "
              "(direct-again shows the measurement's own noise)")
        decision = gw.metric("pypto_gateway_routing_decision_seconds_sum") / max(
            gw.metric("pypto_gateway_routing_decision_seconds_count"), 1)
        write_result("gateway_overhead", {"requests_per_path": args.requests * args.rounds, "rounds": args.rounds,
                                          "max_tokens": 1, "order": "shuffled", "e2e_ms": table, "added_ms": added,
                                          "added_ms_by_round": rounds, "cpu_us_per_request": cpu_us,
                                          "inside_gateway_ms": inside_ms,
                                          "gateway_mean_decision_us": decision * 1e6,
                                          "target": {"p50_ms": 1, "p99_ms": 5}, "met": met})
    finally:
        nginx.stop()
        gw.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
