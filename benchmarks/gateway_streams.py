"""Benchmark 4: 1,000 concurrent streams through one gateway (4 real engines behind it) with no errors.

Run: `.venv/bin/python benchmarks/gateway_streams.py`; writes docs/benchmarks/gateway_streams.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_common import gateway, model_name, start_engines, write_result
from pypto_serving.engine.bench import run_benchmark
from tests.support.models import tiny_model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client side holds 1,000 sockets too
    engines = start_engines(tiny_model_dir("qwen3"), 4, ["--max-num-seqs", "256", "--max-model-len", "512"],
                            Path(tempfile.mkdtemp()))
    gw = gateway("--endpoints", ",".join(e.url for e in engines))
    try:
        model = model_name(gw.url)
        r = run_benchmark(base_url=gw.url, model=model, num_prompts=args.streams, max_concurrency=args.streams,
                          random_input_len="32", random_output_len=str(args.output_len), seed=3,
                          timeout_s=600, progress=False)
        served = {name: gw.metric("pypto_gateway_requests_total", replica=name, code="200")
                  for name in gw.replicas()}
        met = r["errors"] == 0 and r["completed"] == args.streams
        print(f"{args.streams} concurrent streams: completed {r['completed']}, errors {r['errors']} "
              f"{r['error_samples'][:2]}, duration {r['duration_s']:.1f}s, TTFT p99 {r['ttft_ms']['p99']:.0f} ms, "
              f"per replica {sorted(served.values())} -> {'MET' if met else 'MISSED'}")
        write_result("gateway_streams", {"streams": args.streams, "output_len": args.output_len, "replicas": 4,
                                         "completed": r["completed"], "errors": r["errors"],
                                         "duration_s": r["duration_s"], "ttft_ms": r["ttft_ms"],
                                         "e2e_ms": r["e2e_ms"], "per_replica": served, "met": met})
    finally:
        gw.stop()
        for engine in engines:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
