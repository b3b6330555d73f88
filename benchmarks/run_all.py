"""`make bench`: run every benchmark one after the other, then regenerate docs/benchmarks.md and its plots.

Each benchmark is its own script (a subprocess) writing docs/benchmarks/<name>.json; ratios inside a benchmark
are always measured side by side in that one run. The load average before and after each run is recorded in
docs/benchmarks/runs.json, since the machine's cores may be shared. A failed benchmark is reported and the others
still run; the report is written from whatever JSON exists.

    .venv/bin/python benchmarks/run_all.py [--only engine_vs_transformers,gateway_routing] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = REPO_ROOT / "docs" / "benchmarks" / "runs.json"

# name -> command (relative to the repository root), in the order they run.
BENCHMARKS: dict[str, list[str]] = {
    "engine_vs_transformers": ["benchmarks/engine_vs_transformers.py"],
    "engine_cpu_speed": ["benchmarks/engine_cpu_speed.py"],
    "vllm_cpu_compare": ["benchmarks/vllm_cpu_compare.py"],
    "vllm_cpu_compare_bfloat16": ["benchmarks/vllm_cpu_compare.py", "--dtype", "bfloat16"],
    "pp": ["benchmarks/pp_bench.py"],
    "moe_ep": ["benchmarks/moe_ep.py"],
    "dp_ep": ["benchmarks/dp_ep.py"],
    "gateway_decision": ["benchmarks/gateway_decision.py"],
    "gateway_stacks": ["benchmarks/gateway_stacks.py"],
    "gateway_overhead": ["benchmarks/gateway_overhead.py"],
    "gateway_routing": ["benchmarks/gateway_routing.py"],
    "gateway_prefix": ["benchmarks/gateway_prefix.py"],
    "gateway_queue": ["benchmarks/gateway_queue.py"],
    "gateway_streams": ["benchmarks/gateway_streams.py"],
    "gateway_idle": ["benchmarks/gateway_idle.py"],
    "gateway_cpu": ["benchmarks/gateway_cpu.py", "--builds", "HEAD,nginx", "--record"],
    "operator": ["benchmarks/operator_bench.py"],
    "groups": ["benchmarks/groups_bench.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--report-only", action="store_true", help="only regenerate docs/benchmarks.md")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}")
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    failed = []
    if not args.report_only:
        for i, name in enumerate(chosen, 1):
            command = [sys.executable, *BENCHMARKS[name]]
            load = os.getloadavg()[0]
            print(f"==> [{i}/{len(chosen)}] {name}: {' '.join(BENCHMARKS[name])} (load average {load:.2f})",
                  flush=True)
            started = time.monotonic()
            code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
            took = time.monotonic() - started
            runs[name] = {"command": ".venv/bin/python " + " ".join(BENCHMARKS[name]), "exit_code": code,
                          "seconds": round(took, 1), "load_average_before": round(load, 2),
                          "load_average_after": round(os.getloadavg()[0], 2),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")}
            print(f"==> {name} {'done' if code == 0 else f'FAILED ({code})'} in {took:.0f}s", flush=True)
            if code != 0:
                failed.append(name)
            RUNS.write_text(json.dumps(runs, indent=2) + "\n")
    from benchmarks.bench_report import write_report

    write_report()
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
