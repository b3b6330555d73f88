"""Benchmark 1, proxy overhead: direct to one engine vs through the gateway vs through nginx (round-robin reverse
proxy), max_tokens=1, at concurrency 1 and 32, all against the same real engine in one run.

Targets: the gateway adds <= 1 ms p50 and <= 5 ms p99 of end-to-end latency.
Run: `.venv/bin/python benchmarks/gateway_overhead.py [--requests N]`; writes docs/benchmarks/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_common import Nginx, gateway, model_name, start_engines, write_result
from pypto_serving.engine.bench import BenchRequest, run_benchmark
from tests.support.models import tiny_model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=400, help="requests per target and concurrency")
    p.add_argument("--rounds", type=int, default=2, help="targets are measured in interleaved rounds")
    args = p.parse_args(argv)
    (engine,) = start_engines(tiny_model_dir("qwen3"), 1, ["--max-num-seqs", "64"], Path(tempfile.mkdtemp()))
    gw = gateway("--endpoints", engine.url)
    nginx = Nginx([engine.url])
    try:
        model = model_name(engine.url)
        targets = {"direct": engine.url, "gateway": gw.url, "nginx": nginx.url}
        requests = [BenchRequest("measure the proxy overhead " * 4, 24, 1)] * args.requests
        for url in targets.values():  # warm up connections and code paths
            run_benchmark(requests[:50], base_url=url, model=model, max_concurrency=8, progress=False)
        samples: dict[str, dict[int, list[dict]]] = {t: {1: [], 32: []} for t in targets}
        for _ in range(args.rounds):
            for concurrency in (1, 32):
                for name, url in targets.items():
                    result = run_benchmark(requests, base_url=url, model=model, max_concurrency=concurrency,
                                           progress=False)
                    assert result["errors"] == 0, result["error_samples"]
                    samples[name][concurrency].append(result["e2e_ms"])
        table: dict[str, dict[str, dict[str, float]]] = {}
        for name in targets:
            table[name] = {}
            for concurrency in (1, 32):
                runs = samples[name][concurrency]
                table[name][f"c{concurrency}"] = {q: sorted(r[q] for r in runs)[len(runs) // 2] for q in ("p50", "p99")}
        print(f"{'e2e ms (median of rounds)':28s} {'c1 p50':>8s} {'c1 p99':>8s} {'c32 p50':>8s} {'c32 p99':>8s}")
        for name, row in table.items():
            print(f"{name:28s} {row['c1']['p50']:8.2f} {row['c1']['p99']:8.2f} {row['c32']['p50']:8.2f} "
                  f"{row['c32']['p99']:8.2f}")
        added = {proxy: {c: {q: table[proxy][c][q] - table["direct"][c][q] for q in ("p50", "p99")}
                         for c in ("c1", "c32")} for proxy in ("gateway", "nginx")}
        for proxy, row in added.items():
            print(f"{proxy} adds: c1 p50 {row['c1']['p50']:+.2f} ms, p99 {row['c1']['p99']:+.2f} ms; "
                  f"c32 p50 {row['c32']['p50']:+.2f} ms, p99 {row['c32']['p99']:+.2f} ms")
        met = all(added["gateway"][c]["p50"] <= 1.0 and added["gateway"][c]["p99"] <= 5.0 for c in ("c1", "c32"))
        print(f"target gateway <= +1 ms p50 and <= +5 ms p99: {'MET' if met else 'MISSED'}")
        write_result("gateway_overhead", {"requests": args.requests, "rounds": args.rounds, "max_tokens": 1,
                                          "e2e_ms": table, "added_ms": added, "target": {"p50_ms": 1, "p99_ms": 5},
                                          "met": met})
    finally:
        nginx.stop()
        gw.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
