"""Pipeline parallelism on cpu: the non-blocking micro-batch loop against the blocking one and against PP=1.

The workload: 64 requests, prompts of 32-512 random token ids and outputs of 16-256 tokens (fixed seed; EOS
ignored, so every output runs to its length), all added at once to an `LLMEngine`, on the ~50M-parameter Qwen3
of the engine microbenchmark (10 layers, hidden 512, vocab 16384), float32, one torch thread per rank:

* PP=1: one rank in the engine process;
* PP=2 blocking (`--pp-blocking`): two stage processes, one micro-batch in flight;
* PP=2 non-blocking: two micro-batches in flight (the default), with the even split (5,5) and with a split that
  gives the last stage fewer layers because it also runs the LM head over a 16k vocabulary (6,4).

Reported per run: wall seconds, CPU seconds (engine and stage processes), each stage's own CPU seconds, output
tokens per wall and per CPU second, steps, the stages' idle (bubble) ratios, the 1-minute load average at its end,
and the speed-ups, from each contender's best run and from its median run. The machine is shared: the contenders run
interleaved ``--repeats`` times (every run is in the JSON). Under load, wall time measures the machine's other work
as much as the engine; per CPU second is robust to it but cannot show what pipelining buys (running two stages at
once). So the report adds the pipeline bound: the speed-up the stage CPU seconds allow on two otherwise idle cores,
where the busiest stage sets the pace (the blocking run's stages take turns, so its stages' CPU seconds add up;
PP=1's one stage does all the work).

Run: `.venv/bin/python benchmarks/pp_bench.py [--requests 64] [--repeats 2]`; writes docs/benchmarks/pp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.engine_vs_transformers import cpu_seconds  # noqa: E402
from pypto_serving.engine import cpu_matmul  # noqa: E402
from pypto_serving.engine.config import EngineConfig  # noqa: E402
from pypto_serving.engine.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from pypto_serving.engine.llm_engine import LLMEngine  # noqa: E402
from pypto_serving.engine.microbench import SIZES, bench_model_dir  # noqa: E402
from pypto_serving.engine.sampling_params import SamplingParams  # noqa: E402

RESULT = REPO_ROOT / "docs" / "benchmarks" / "pp.json"
RUNS = {
    "pp1": {"pipeline_parallel_size": 1},
    "pp2_blocking": {"pipeline_parallel_size": 2, "pp_blocking": True},
    "pp2": {"pipeline_parallel_size": 2},
    "pp2_6_4": {"pipeline_parallel_size": 2, "pp_layer_partition": "6,4"},
}


SPEED_UPS = [(key, base) for key in ("pp2", "pp2_6_4") for base in ("pp2_blocking", "pp1")]  # (contender, baseline)


def speed_ups(tok_s: dict[str, float]) -> dict[str, float]:
    """``{contender}_vs_{baseline}``: output tokens/s ratios of the contenders that ran, from ``tok_s`` by run name."""
    return {f"{key}_vs_{base}": round(tok_s[key] / tok_s[base], 2)
            for key, base in SPEED_UPS if key in tok_s and base in tok_s}


def log(message: str) -> None:
    print(f"[pp-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs: prompts of 32-512 tokens, outputs of 16-256."""
    rng = random.Random(seed)
    return [([rng.randrange(10, 16000) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
            for _ in range(n)]


def projection_ms(batches: tuple[int, ...] = (17, 34), layers: int = 5) -> dict[str, dict[str, float]]:
    """Thread CPU ms of one stage's projections (``layers`` decoder layers of the bench model: qkv, o, gate_up,
    down) for a decode batch: through ``F.linear`` (MKL packs each weight again on every call) and through the
    weights prepacked once, as the engine runs them on cpu (engine/cpu_matmul.py)."""
    torch.set_num_threads(1)  # as each rank runs
    h, i, d = SIZES["hidden"], SIZES["intermediate"], SIZES["hidden"] // SIZES["heads"]
    shapes = [(h, (SIZES["heads"] + 2 * SIZES["kv_heads"]) * d, ColumnParallelLinear),
              (SIZES["heads"] * d, h, RowParallelLinear), (h, 2 * i, ColumnParallelLinear), (i, h, RowParallelLinear)]
    torch.manual_seed(0)
    variants: dict[str, list[torch.nn.Module]] = {}
    for kind in ("dense", "prepacked"):
        variants[kind] = [cls(n_in, n_out) for _ in range(layers) for n_in, n_out, cls in shapes]
        for m in variants[kind]:
            m.weight.data.normal_()
        if kind == "prepacked" and not cpu_matmul.prepack(torch.nn.ModuleList(variants[kind])):
            return {}  # no oneDNN in this torch: nothing to compare
    inputs = {b: [torch.randn(b, n_in) for _ in range(layers) for n_in, _, _ in shapes] for b in batches}
    best = {kind: {b: float("inf") for b in batches} for kind in variants}
    for _ in range(15):  # interleaved, so a busy spell of the shared machine hits both variants
        for kind, mods in variants.items():
            for b, xs in inputs.items():
                start = time.thread_time()
                for m, x in zip(mods, xs, strict=True):
                    m(x)
                best[kind][b] = min(best[kind][b], time.thread_time() - start)
    return {kind: {str(b): round(t * 1e3, 2) for b, t in times.items()} for kind, times in best.items()}


def stage_cpu_seconds(engine: LLMEngine) -> list[float]:
    """CPU seconds so far of each pipeline stage: its (TP rank 0) process, or PP=1's model runner thread."""
    procs = getattr(engine.executor, "procs", None)
    if procs is None:
        runner = next(t.native_id for t in threading.enumerate() if t.name == "pypto-model-runner")
        return [next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == runner)]
    tp = engine.config.tensor_parallel_size
    return [sum(psutil.Process(procs[s * tp].pid).cpu_times()[:2]) for s in range(len(procs) // tp)]


def run(model: Path, overrides: dict[str, Any], requests: list[tuple[list[int], int]],
        dtype: str = "float32") -> dict[str, Any]:
    """All requests at once; wall time from the first add to the last token."""
    engine = LLMEngine(EngineConfig(model=str(model), dtype=dtype, max_model_len=1024, cpu_threads=1,
                                    cpu_prepack=True, max_num_seqs=len(requests), **overrides))
    try:
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        engine.add_request("warm", requests[0][0][:64], warm)
        while engine.has_unfinished_requests():
            engine.step()
        stats0 = engine.stats()
        stage0 = stage_cpu_seconds(engine)
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
        stage_cpu = [b - a for a, b in zip(stage0, stage_cpu_seconds(engine), strict=True)]
        stats = engine.stats()
    finally:
        engine.shutdown()
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 1), "output_tokens_per_cpu_s": round(tokens / cpu, 1),
            "load_average": os.getloadavg()[0], "stage_cpu_s": [round(c, 2) for c in stage_cpu],
            "steps": stats["num_steps"] - stats0["num_steps"],
            "stage_idle_ratio": [round(r, 3) for r in stats["pp_stage_idle_ratio"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--projections-only", action="store_true",
                        help="only remeasure the per-micro-batch projection cost into the existing --out JSON")
    args = parser.parse_args(argv)
    if args.projections_only:
        report = json.loads(args.out.read_text())
        report["projection_ms"] = projection_ms()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"one stage's projections (5 layers), thread CPU ms by decode batch: {report['projection_ms']}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = bench_model_dir()
    requests = workload(args.requests)
    log(f"{len(requests)} requests: {sum(len(p) for p, _ in requests)} prompt tokens, "
        f"{sum(n for _, n in requests)} output tokens")
    results: dict[str, Any] = {}
    all_runs: dict[str, list[dict[str, Any]]] = {}
    for attempt in range(args.repeats):  # interleaved, so a busy spell of the shared machine hits every contender
        for name in args.runs.split(","):
            got = run(model, RUNS[name], requests, args.dtype)
            log(f"{name} #{attempt + 1}: {got}")
            all_runs.setdefault(name, []).append(got)
            if name not in results or got["wall_s"] < results[name]["wall_s"]:
                results[name] = got
    speedups = speed_ups({name: r["output_tokens_per_s"] for name, r in results.items()})
    speedups_median = speed_ups({name: statistics.median(r["output_tokens_per_s"] for r in runs)
                                 for name, runs in all_runs.items()})
    # the speed-ups the stages' CPU seconds allow on two free cores (the busiest stage sets the pace); the
    # blocking run's and PP=1's stages take turns, so all of their stage CPU is on the clock
    bounds = {f"{key}_vs_{base}": round(sum(results[base]["stage_cpu_s"]) / max(results[key]["stage_cpu_s"]), 2)
              for key, base in SPEED_UPS if key in results and base in results}
    projections = projection_ms()
    log(f"one stage's projections (5 layers), thread CPU ms by decode batch: {projections}")
    machine = {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "python": platform.python_version()}
    report = {"machine": machine, "dtype": args.dtype,
              "requests": len(requests), "repeats": args.repeats, "results": results, "speedups": speedups,
              "speedups_median": speedups_median,
              "pipeline_bounds": bounds, "projection_ms": projections, "all_runs": all_runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"speed-ups (best runs) {json.dumps(speedups)}; (median runs) {json.dumps(speedups_median)}; "
        f"pipeline bounds from the stage CPU seconds {json.dumps(bounds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
