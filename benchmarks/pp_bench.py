"""Pipeline parallelism on cpu: the non-blocking micro-batch loop against the blocking one and against PP=1.

The workload: 64 requests, prompts of 32-512 random token ids and outputs of 16-256 tokens (fixed seed; EOS
ignored, so every output runs to its length), all added at once to an `LLMEngine`, on the ~50M-parameter Qwen3
of the engine microbenchmark (10 layers, hidden 512, vocab 16384), float32, one torch thread per rank:

* PP=1: one rank in the engine process;
* PP=2 blocking (`--pp-blocking`): two stage processes, one micro-batch in flight;
* PP=2 non-blocking: two micro-batches in flight (the default), with the even split (5,5) and with a split that
  gives the last stage fewer layers because it also runs the LM head over a 16k vocabulary (6,4).

Reported per run: wall seconds, CPU seconds (engine and stage processes), output tokens per wall and per CPU
second, steps, the stages' idle (bubble) ratios, the 1-minute load average at its end, and the speed-ups. The
machine is shared: the contenders run interleaved ``--repeats`` times and each keeps its best wall time (every
run is in the JSON). Under load, wall time measures the machine's other work as much as the engine; per CPU
second is robust to it but cannot show what pipelining buys (running two stages at once).

Run: `.venv/bin/python benchmarks/pp_bench.py [--requests 64] [--repeats 2]`; writes docs/benchmarks/pp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402

from benchmarks.engine_vs_transformers import cpu_seconds  # noqa: E402
from pypto_serving.engine.config import EngineConfig  # noqa: E402
from pypto_serving.engine.llm_engine import LLMEngine  # noqa: E402
from pypto_serving.engine.microbench import bench_model_dir  # noqa: E402
from pypto_serving.engine.sampling_params import SamplingParams  # noqa: E402

RESULT = REPO_ROOT / "docs" / "benchmarks" / "pp.json"
RUNS = {
    "pp1": {"pipeline_parallel_size": 1},
    "pp2_blocking": {"pipeline_parallel_size": 2, "pp_blocking": True},
    "pp2": {"pipeline_parallel_size": 2},
    "pp2_6_4": {"pipeline_parallel_size": 2, "pp_layer_partition": "6,4"},
}


def log(message: str) -> None:
    print(f"[pp-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs: prompts of 32-512 tokens, outputs of 16-256."""
    rng = random.Random(seed)
    return [([rng.randrange(10, 16000) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
            for _ in range(n)]


def run(model: Path, overrides: dict[str, Any], requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    """All requests at once; wall time from the first add to the last token."""
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", max_model_len=1024, cpu_threads=1,
                                    cpu_prepack=True, max_num_seqs=len(requests), **overrides))
    try:
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        engine.add_request("warm", requests[0][0][:64], warm)
        while engine.has_unfinished_requests():
            engine.step()
        stats0 = engine.stats()
        cpu0, start = cpu_seconds(psutil.Process()), time.perf_counter()
        for i, (prompt, n) in enumerate(requests):
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.error:
                    raise RuntimeError(out.error)
                tokens += len(out.new_token_ids)
        wall, cpu = time.perf_counter() - start, cpu_seconds(psutil.Process()) - cpu0
        stats = engine.stats()
    finally:
        engine.shutdown()
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 1), "output_tokens_per_cpu_s": round(tokens / cpu, 1),
            "load_average": os.getloadavg()[0],
            "steps": stats["num_steps"] - stats0["num_steps"],
            "stage_idle_ratio": [round(r, 3) for r in stats["pp_stage_idle_ratio"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = bench_model_dir()
    requests = workload(args.requests)
    log(f"{len(requests)} requests: {sum(len(p) for p, _ in requests)} prompt tokens, "
        f"{sum(n for _, n in requests)} output tokens")
    results: dict[str, Any] = {}
    all_runs: dict[str, list[dict[str, Any]]] = {}
    for attempt in range(args.repeats):  # interleaved, so a busy spell of the shared machine hits every contender
        for name in args.runs.split(","):
            got = run(model, RUNS[name], requests)
            log(f"{name} #{attempt + 1}: {got}")
            all_runs.setdefault(name, []).append(got)
            if name not in results or got["wall_s"] < results[name]["wall_s"]:
                results[name] = got
    speedups = {}
    if "pp2" in results:
        for base in ("pp2_blocking", "pp1"):
            if base in results:
                speedups[f"pp2_vs_{base}"] = round(results["pp2"]["output_tokens_per_s"]
                                                   / results[base]["output_tokens_per_s"], 2)
    if "pp2_6_4" in results and "pp1" in results:
        speedups["pp2_6_4_vs_pp1"] = round(results["pp2_6_4"]["output_tokens_per_s"]
                                           / results["pp1"]["output_tokens_per_s"], 2)
    if "pp2_6_4" in results and "pp2_blocking" in results:
        speedups["pp2_6_4_vs_pp2_blocking"] = round(results["pp2_6_4"]["output_tokens_per_s"]
                                                    / results["pp2_blocking"]["output_tokens_per_s"], 2)
    machine = {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "python": platform.python_version()}
    report = {"machine": machine,
              "requests": len(requests), "repeats": args.repeats, "results": results, "speedups": speedups,
              "all_runs": all_runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(speedups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
