"""Microbenchmark of the engine core on cpu: decode step time by batch size, and prefill throughput.

    python -m pypto_serving.engine.microbench [--dtype float32] [--context 256] [--threads 1]
        [--attention-backend auto|cpu|torch_ref] [--no-cpu-prepack] [--temperature 0]

Runs the model runner directly (no scheduler, no HTTP) on a ~50M-parameter random Qwen3 (10 layers, hidden 512,
8 heads / 4 kv heads, intermediate 1536, vocab 16384) written once under $PYPTO_CACHE_DIR/models. With one
thread it reports thread CPU time, which stays meaningful on a shared, oversubscribed machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.sampler import SamplingBatch
from pypto_serving.engine.model_runner import ModelRunner, StepInput
from pypto_serving.engine.tiny_model import GENERATOR_VERSION, write_tiny_model

SIZES = {"layers": 10, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1536, "vocab": 16384}


def bench_model_dir() -> Path:
    """The ~50M Qwen3 used by the microbenchmark (generated on first use)."""
    cache = Path(os.environ.get("PYPTO_CACHE_DIR", Path.home() / ".cache" / "pypto-serving"))
    path = cache / "models" / f"microbench-qwen3-50m-g{GENERATOR_VERSION}"
    if not (path / "model.safetensors").exists():
        write_tiny_model(path, "qwen3", seed=0, **SIZES)
    return path


def _greedy(n: int, temperature: float = 0.0) -> SamplingBatch:
    return SamplingBatch([temperature] * n, [1.0] * n, [0] * n, [0.0] * n, [None] * n, [0] * n, [-1] * n)


def _time(runner: ModelRunner, step: StepInput, repeats: int) -> float:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    runner.execute(step)
    samples = []
    for _ in range(repeats):
        start = clock()
        runner.execute(step)
        samples.append(clock() - start)
    return sorted(samples)[len(samples) // 2]


def main(argv: list[str] | None = None) -> int:
    """Print decode and prefill timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--context", type=int, default=256, help="context length of every decoding sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--prefill-lengths", default="512,2048")
    parser.add_argument("--attention-backend", default="auto", help="auto|cpu|torch_ref (engine/attention_backends)")
    parser.add_argument("--cpu-prepack", action=argparse.BooleanOptionalAction, default=True,
                        help="oneDNN prepacked matmuls (engine/cpu_matmul.py)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the decodes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bs = 16
    config = EngineConfig(model=str(bench_model_dir()), dtype=args.dtype, num_kv_blocks=8192, block_size=bs,
                          attention_backend=args.attention_backend, cpu_prepack=args.cpu_prepack)
    runner = ModelRunner(config, "cpu", max_model_len=4096)
    clock = "thread cpu time" if args.threads == 1 else "wall time"
    print(f"~50M qwen3, {args.dtype}, {args.threads} thread(s), {clock}, decode context {args.context}, "
          f"attention {runner.attn_backend.name}, {runner.packed_linears} prepacked linears")
    for batch in map(int, args.batch_sizes.split(",")):
        nb = -(-args.context // bs)
        tables = [list(range(i * nb, (i + 1) * nb)) for i in range(batch)]
        ctxs = [args.context - (i % 7) * 3 for i in range(batch)]  # slightly different lengths
        step = StepInput(0, [5] * batch, [1] * batch, ctxs, tables, list(range(batch)),
                         _greedy(batch, args.temperature))
        t = _time(runner, step, 5)
        print(f"decode batch {batch:4d}: {t * 1e3:8.1f} ms/step {batch / t:8.1f} tok/s")
    for length in map(int, args.prefill_lengths.split(",")):
        step = StepInput(0, [5] * length, [length], [length], [list(range(-(-length // bs)))], [0], _greedy(1))
        t = _time(runner, step, 3)
        print(f"prefill {length:5d} tokens: {t * 1e3:8.1f} ms {length / t:8.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
