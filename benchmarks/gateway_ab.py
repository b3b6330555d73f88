"""Two builds of the gateway side by side in one run: does a change make it add less latency at concurrency 32?

This machine's 2 cores are shared, and the same code measures tens of percent apart from one run to the next,
so a change to the gateway's hot path can only be judged against the code before it *in the same run*. This
script makes runnable copies of the gateway at two git revisions (``--a``, ``--b``; ``WORKTREE`` is the working
tree with its uncommitted changes) and runs wrk against four paths at once, 8 connections each (32 in flight at
one engine, as in benchmarks/gateway_overhead.py): direct, A, B and nginx. Reported per round and as medians:
each path's p50 / p99 added to direct, B - A, and each build's CPU per request. Two copies of the same revision
show the method's own noise (about 0.3 ms p50 per comparison when last measured).
Run: `.venv/bin/python benchmarks/gateway_ab.py --a HEAD --b WORKTREE [--rounds 8] [--seconds 6] [--record NAME]`;
prints, and with ``--record`` also writes docs/benchmarks/NAME.json (docs/benchmarks.md shows
``gateway_stack_change``: the hand-written HTTP stack against aiohttp's, issue 20).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_common import REPO_ROOT, Nginx, cpu_seconds, model_name, start_engines, write_result
from benchmarks.gateway_overhead import ENGINE_ARGS, WRK_IN_FLIGHT, wrk_mixed
from tests.gateway.harness import start_gateway
from tests.support.models import tiny_model_dir

WORKTREE = "WORKTREE"
PARTS = ("pypto_serving", "gateway")  # what `python -m pypto_serving gateway` needs (setup.py maps gateway/)


def build_tree(revision: str, into: Path) -> Path:
    """A folder from which `python -m pypto_serving gateway` runs the gateway at ``revision``."""
    source = into / "src"
    source.mkdir(parents=True)
    if revision == WORKTREE:
        for part in PARTS:
            shutil.copytree(REPO_ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "archive", revision, *PARTS], cwd=REPO_ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    tree = into / "tree"
    shutil.move(source / "pypto_serving", tree / "pypto_serving")
    shutil.move(source / "gateway", tree / "pypto_serving" / "gateway")
    return tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--a", default="HEAD", help=f"git revision of build A, or {WORKTREE}")
    p.add_argument("--b", default=WORKTREE, help=f"git revision of build B, or {WORKTREE}")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per round")
    p.add_argument("--record", help="also write docs/benchmarks/RECORD.json")
    args = p.parse_args(argv)
    load_before, started = os.getloadavg()[0], time.time()
    work = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    trees = {"A": build_tree(args.a, work / "a"), "B": build_tree(args.b, work / "b")}
    (engine,) = start_engines(tiny_model_dir("qwen3"), 1, ENGINE_ARGS, work)
    gateways = {name: start_gateway("--endpoints", engine.url, cwd=tree, timeout=60) for name, tree in trees.items()}
    nginx = Nginx([engine.url])
    try:
        model = model_name(engine.url)
        targets = {"direct": engine.url, "A": gateways["A"].url, "B": gateways["B"].url, "nginx": nginx.url}
        connections = WRK_IN_FLIGHT // len(targets)
        wrk_mixed(targets, model, connections, 3)  # warm-up
        cpu_before = {name: cpu_seconds(gw.proc.pid) for name, gw in gateways.items()}
        rounds = []
        for round_no in range(args.rounds):
            rounds.append(wrk_mixed(targets, model, connections, args.seconds))
            print(f"round {round_no + 1}/{args.rounds}: " + ", ".join(
                f"{name} p50 {r['p50']:.2f} / p99 {r['p99']:.2f} ms" for name, r in rounds[-1].items()), flush=True)
        print(f"A = {args.a}, B = {args.b}; added to direct (median of {args.rounds} rounds, per round in brackets):")
        for name in ("A", "B", "nginx"):
            added = {q: [r[name][q] - r["direct"][q] for r in rounds] for q in ("p50", "p99")}
            print(f"  {name:5s} p50 {statistics.median(added['p50']):+.2f} ms "
                  f"[{' '.join(f'{v:+.2f}' for v in added['p50'])}], p99 {statistics.median(added['p99']):+.2f} ms")
        b_minus_a = [r["B"]["p50"] - r["A"]["p50"] for r in rounds]
        print(f"B - A p50: median {statistics.median(b_minus_a):+.2f} ms, mean {statistics.mean(b_minus_a):+.2f} ms")
        cpu_us = {}
        for name, gw in gateways.items():
            requests = sum(r[name]["requests"] for r in rounds)
            cpu_us[name] = (cpu_seconds(gw.proc.pid) - cpu_before[name]) / requests * 1e6
            print(f"{name} CPU per request: {cpu_us[name]:.0f} us")
        if args.record:
            write_result(args.record, {
                "a": args.a, "b": args.b, "rounds": rounds, "seconds": args.seconds,
                "connections_per_path": connections, "cpu_us_per_request": cpu_us,
                "added_ms_median": {name: {q: statistics.median(r[name][q] - r["direct"][q] for r in rounds)
                                           for q in ("p50", "p90", "p99")} for name in ("A", "B", "nginx")},
                "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                "wall_s": round(time.time() - started, 1), "load_average_before": round(load_before, 2),
                "load_average_after": round(os.getloadavg()[0], 2)})
    finally:
        nginx.stop()
        for gw in gateways.values():
            gw.stop()
        engine.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
