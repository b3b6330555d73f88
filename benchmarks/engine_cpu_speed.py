"""Engine core speed on cpu: the attention backends, prepacked matmuls, bf16 and threads, side by side in one run.

Runs `python -m pypto_serving.engine.microbench` (the model runner alone on the ~50M Qwen3: decode steps at
batch 1 / 16 / 64 with context 256, and a 512-token prefill) once per configuration and round, alternating the
configurations within each round, and keeps each configuration's best round (the least disturbed by other work
on a shared machine). Configurations:

* ``reference``: the previous engine core: attention_backend torch_ref (gather + SDPA), plain F.linear;
* ``kernel``: the CPU attention backend (in-place paged kernel), plain F.linear;
* ``prepack``: torch_ref attention, prepacked oneDNN matmuls;
* ``new``: both (the default now);

in float32 and bfloat16 (reference vs new) with 1 thread (thread CPU time; ``--two-threads`` adds 2 threads, wall
time). Also the
sampler (64 rows x 16,384 vocab) against the previous algorithm (an exponential race over the whole vocabulary,
and a full sort for top-k / top-p), and the decode floor: weight bytes / measured copy bandwidth.

Run: `.venv/bin/python benchmarks/engine_cpu_speed.py [--rounds 2]`; writes docs/benchmarks/engine_cpu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.engine_vs_transformers import copy_bandwidth_gbs  # noqa: E402
from pypto_serving.engine.layers.sampler import Sampler, SamplingBatch  # noqa: E402
from pypto_serving.engine.microbench import bench_model_dir  # noqa: E402

RESULT = REPO_ROOT / "docs" / "benchmarks" / "engine_cpu_speed.json"
CONFIGS = {"reference": ["--attention-backend", "torch_ref", "--no-cpu-prepack"],
           "kernel": ["--attention-backend", "cpu", "--no-cpu-prepack"],
           "prepack": ["--attention-backend", "torch_ref", "--cpu-prepack"],
           "new": ["--attention-backend", "cpu", "--cpu-prepack"]}
# (dtype, threads) -> configurations measured there; --two-threads adds the 2-thread rows (wall time, which is
# meaningless while other work oversubscribes the cores: OpenMP threads then wait on descheduled peers)
MATRIX = {("float32", 1): ["reference", "kernel", "prepack", "new"], ("bfloat16", 1): ["reference", "new"]}
TWO_THREADS = {("float32", 2): ["reference", "new"], ("bfloat16", 2): ["reference", "new"]}
LINE = re.compile(r"(decode batch|prefill)\s+(\d+)(?: tokens)?:\s+([\d.]+) ms")


def log(message: str) -> None:
    print(f"[engine-cpu-speed {time.strftime('%H:%M:%S')}] {message}", flush=True)


def microbench(config: str, dtype: str, threads: int) -> dict[str, float]:
    """ms per decode step by batch ("decode_1", ...) and per prefill ("prefill_512") of one microbench run."""
    command = [sys.executable, "-m", "pypto_serving.engine.microbench", "--dtype", dtype, "--threads",
               str(threads), "--batch-sizes", "1,16,64", "--prefill-lengths", "512", *CONFIGS[config]]
    out = subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=900).stdout
    return {f"{'decode' if kind == 'decode batch' else 'prefill'}_{n}": float(ms)
            for kind, n, ms in LINE.findall(out)}


def _previous_sample(logits: torch.Tensor, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """The sampler before the fast paths: full-vocabulary sort for top-k / top-p, an exponential per entry."""
    probs = torch.softmax(logits, dim=-1)
    if top_k > 0 or top_p < 1.0:
        vocab = probs.shape[1]
        sorted_p, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab)[None, :]
        sorted_p = sorted_p.masked_fill(ranks >= (top_k if top_k > 0 else vocab), 0.0)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p * sorted_p.sum(dim=-1, keepdim=True)
        drop[:, 0] = False
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    return (probs / torch.empty_like(probs).exponential_(generator=gen)).argmax(dim=-1)


def sampler_ms(rows: int = 64, vocab: int = 16384, repeats: int = 15) -> dict[str, dict[str, float]]:
    """Median thread-CPU ms per sampling call, previous algorithm vs the current Sampler, per setting."""
    torch.set_num_threads(1)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    sampler, gen = Sampler(0, torch.device("cpu")), torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for name, k, p in (("temperature 1", 0, 1.0), ("top-k 50", 50, 1.0), ("top-p 0.9", 0, 0.9),
                       ("top-k 50 + top-p 0.9", 50, 0.9)):
        batch = SamplingBatch([1.0] * rows, [p] * rows, [k] * rows, [0.0] * rows, [None] * rows, [0] * rows,
                              [-1] * rows)
        timings = {}
        for label, fn in (("previous", lambda k=k, p=p: _previous_sample(logits, k, p, gen)),
                          ("current", lambda b=batch: sampler(logits.clone(), b))):
            fn()
            samples = []
            for _ in range(repeats):
                started = time.thread_time()
                fn()
                samples.append(time.thread_time() - started)
            timings[label] = round(sorted(samples)[repeats // 2] * 1e3, 2)
        out[name] = timings
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--two-threads", action="store_true", help="also measure 2 threads (wall time)")
    args = parser.parse_args(argv)
    matrix = {**MATRIX, **(TWO_THREADS if args.two_threads else {})}
    model_dir = bench_model_dir()
    load_start = os.getloadavg()
    log(f"load average {load_start[0]:.2f}; {args.rounds} rounds of {sum(map(len, matrix.values()))} runs")
    best: dict[str, dict[str, float]] = {}
    loads: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for (dtype, threads), configs in matrix.items():
            for config in configs:
                key = f"{dtype}/{threads}t/{config}"
                load = os.getloadavg()[0]
                got = microbench(config, dtype, threads)
                loads.setdefault(key, []).append(round(load, 2))
                best[key] = {m: min(v, best.get(key, {}).get(m, v)) for m, v in got.items()}
                log(f"round {r + 1} {key} (load {load:.2f}): {got}")
    bandwidth = copy_bandwidth_gbs()
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    sampling = sampler_ms()
    log(f"sampler: {sampling}")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds, "torch": torch.__version__,
        "model": {"dir": model_dir.name, "weight_bytes": weight_bytes}, "context": 256,
        "load_average_start": round(load_start[0], 2), "load_average_end": round(os.getloadavg()[0], 2),
        "copy_bandwidth_gbs": round(bandwidth, 2), "decode_floor_ms": round(floor_ms, 2),
        "runs": {k: {"best_ms": v, "load_averages": loads[k]} for k, v in best.items()},
        "sampler_ms": sampling,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
