"""Engine vs transformers on the same offline workload, side by side in one run (cpu).

The workload: 64 requests with prompts of 32-512 tokens and outputs of 16-256 tokens (fixed seed; every output
runs to its length, EOS ignored) on the ~50M-parameter Qwen3 of the engine microbenchmark (10 layers, hidden 512,
random weights), float32, one CPU thread for every contender:

* engine: a real `pypto-serving engine` process (continuous batching, paged KV), all 64 requests sent at once
  through the OpenAI API by `pypto-serving bench` (its library `run_benchmark`);
* transformers `generate`: static left-padded batches of 16 in arrival order, each run until its longest output
  (`min_new_tokens = max_new_tokens`), the usual way to batch with plain transformers;
* transformers continuous batching (`init_continuous_batching`, the manager behind `generate_batch`), each
  request with its own `max_new_tokens`.

Reported per contender: wall seconds, CPU seconds of the process doing the work (robust on a shared machine),
useful output tokens per wall second and per CPU second, and the ratios to the engine. Plus the decode step
time of the engine's model runner at batch 1 and 64 (context 256) against the memory-bandwidth floor: the
weight bytes divided by the measured copy bandwidth (a decode step must read every weight once).

Run: `.venv/bin/python benchmarks/engine_vs_transformers.py [--requests 64] [--threads 1] [--no-continuous]`;
writes docs/benchmarks/engine_vs_transformers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from pypto_serving.engine.bench import BenchConfig, BenchRequest, arun_benchmark, make_dataset  # noqa: E402
from pypto_serving.engine.microbench import bench_model_dir  # noqa: E402

RESULT = REPO_ROOT / "docs" / "benchmarks" / "engine_vs_transformers.json"


def log(message: str) -> None:
    print(f"[engine-vs-hf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Best-of copy bandwidth (bytes read + written per second) of one thread, in GB/s."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - started))
    return best / 1e9


def decode_step_ms(model_dir: Path, batches: list[int], context: int = 256) -> dict[int, float]:
    """Median thread-CPU ms of one engine decode step (model runner only) per batch size."""
    from pypto_serving.engine.config import EngineConfig
    from pypto_serving.engine.layers.sampler import SamplingBatch
    from pypto_serving.engine.model_runner import ModelRunner, StepInput

    bs = 16
    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=2048, block_size=bs),
                         "cpu", max_model_len=1024)
    out = {}
    for batch in batches:
        nb = -(-context // bs)
        greedy = SamplingBatch([0.0] * batch, [1.0] * batch, [0] * batch, [0.0] * batch, [None] * batch,
                               [0] * batch, [-1] * batch)
        step = StepInput(0, [5] * batch, [1] * batch, [context] * batch,
                         [list(range(i * nb, (i + 1) * nb)) for i in range(batch)], list(range(batch)), greedy)
        runner.execute(step)
        samples = []
        for _ in range(7):
            started = time.thread_time()
            runner.execute(step)
            samples.append(time.thread_time() - started)
        out[batch] = sorted(samples)[len(samples) // 2] * 1e3
    return out


def run_engine(model_dir: Path, requests: list[BenchRequest], threads: int, log_dir: Path) -> dict[str, Any]:
    """All requests at once through a real engine server; CPU seconds of the engine process."""
    from tests.support.engines import start_engine

    engine = start_engine(model_dir, log_dir=log_dir, timeout=600,
                          extra_args=["--served-model-name", "m", "--dtype", "float32", "--max-model-len", "1024",
                                      "--max-num-seqs", str(len(requests)), "--cpu-threads", str(threads),
                                      "--no-access-log"])
    try:
        config = BenchConfig(base_url=engine.url, model="m", num_prompts=len(requests), progress=False)
        asyncio.run(arun_benchmark(config, requests[:2]))  # warm-up
        proc = psutil.Process(engine.proc.pid)
        cpu0, wall0 = cpu_seconds(proc), time.perf_counter()
        result = asyncio.run(arun_benchmark(config, requests))
        wall, cpu = time.perf_counter() - wall0, cpu_seconds(proc) - cpu0
    finally:
        engine.stop()
    if result["errors"]:
        raise RuntimeError(f"the engine failed {result['errors']} requests: {result['error_samples']}")
    return {"wall_s": wall, "cpu_s": cpu, "output_tokens": result["total_output_tokens"],
            "ttft_p50_ms": result["ttft_ms"]["p50"], "tpot_p50_ms": result["tpot_ms"]["p50"]}


def prompt_ids(model_dir: Path, requests: list[BenchRequest]) -> list[list[int]]:
    """The token ids the engine sees for each prompt (same tokenizer, no special tokens added)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tok.encode(r.prompt, add_special_tokens=False).ids for r in requests]


def run_generate(model: Any, ids: list[list[int]], outputs: list[int], batch: int) -> dict[str, Any]:
    """Static left-padded batches in arrival order, each until its longest output."""
    computed = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, len(ids), batch):
        chunk, lens = ids[start:start + batch], outputs[start:start + batch]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([[0] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        new = max(lens)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        computed += (out.shape[1] - width) * len(chunk)
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "output_tokens": sum(outputs), "computed_tokens": computed, "batch": batch}


def run_continuous(model: Any, ids: list[list[int]], outputs: list[int]) -> dict[str, Any]:
    """transformers' continuous batching manager (what `generate_batch` uses), per-request max_new_tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        warm = manager.add_request(ids[0][:16], request_id="warmup", max_new_tokens=2)
        _collect(manager, {warm})
        cpu0, wall0 = time.process_time(), time.perf_counter()
        wanted = {manager.add_request(x, request_id=f"r{i}", max_new_tokens=n)
                  for i, (x, n) in enumerate(zip(ids, outputs, strict=True))}
        produced = _collect(manager, wanted)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        manager.stop(block=True)
    if produced != sum(outputs):
        raise RuntimeError(f"continuous batching produced {produced} tokens, expected {sum(outputs)}")
    return {"wall_s": wall, "cpu_s": cpu, "output_tokens": produced}


def _collect(manager: Any, wanted: set[str], timeout: float = 3600) -> int:
    produced, deadline = 0, time.monotonic() + timeout
    left = set(wanted)
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} requests unfinished")
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished() and result.request_id in left:
            left.discard(result.request_id)
            produced += len(result.generated_tokens)
    return produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every contender")
    parser.add_argument("--batch", type=int, default=16, help="static batch size of transformers generate")
    parser.add_argument("--no-continuous", action="store_true", help="skip transformers continuous batching")
    parser.add_argument("--json-out", default=str(RESULT))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model_dir = bench_model_dir()
    requests = make_dataset(BenchConfig(base_url="", model="m", num_prompts=args.requests, random_input_len="32:512",
                                        random_output_len="16:256", seed=0, tokenizer=str(model_dir)))
    ids = prompt_ids(model_dir, requests)
    outputs = [r.output_len for r in requests]
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    log(f"{len(requests)} requests, {sum(len(x) for x in ids)} prompt + {sum(outputs)} output tokens; "
        f"model {weight_bytes / 1e6:.0f} MB; load average {load_start[0]:.2f}")

    bandwidth = copy_bandwidth_gbs()
    steps = decode_step_ms(model_dir, [1, 64])
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    log(f"copy bandwidth {bandwidth:.1f} GB/s -> floor {floor_ms:.1f} ms/step; decode step {steps}")

    results: dict[str, Any] = {}
    log("engine: all requests at once through the OpenAI API")
    results["engine"] = run_engine(model_dir, requests, args.threads, Path("/tmp") / f"pypto-evt-{os.getpid()}")
    log(f"engine: {results['engine']}")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    log(f"transformers generate, static batches of {args.batch}")
    results["transformers_generate"] = run_generate(model, ids, outputs, args.batch)
    log(f"transformers generate: {results['transformers_generate']}")
    if not args.no_continuous:
        log("transformers continuous batching")
        try:
            results["transformers_continuous"] = run_continuous(model, ids, outputs)
            log(f"transformers continuous: {results['transformers_continuous']}")
        except Exception as exc:  # recorded: the report says it could not run here
            results["transformers_continuous"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"transformers continuous batching failed: {exc}")

    engine = results["engine"]
    for r in results.values():
        if "wall_s" not in r:
            continue
        r["tok_per_s"] = r["output_tokens"] / r["wall_s"]
        r["tok_per_cpu_s"] = r["output_tokens"] / r["cpu_s"]
        r["engine_speedup_wall"] = r["wall_s"] / engine["wall_s"]
        r["engine_speedup_cpu"] = r["cpu_s"] / engine["cpu_s"]
    report = {
        "command": f".venv/bin/python benchmarks/engine_vs_transformers.py {' '.join(argv or sys.argv[1:])}".strip(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "load_average_start": round(load_start[0], 2), "load_average_end": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "workload": {"requests": len(requests), "prompt_tokens": sum(len(x) for x in ids),
                     "output_tokens": sum(outputs), "prompt_len": "32-512", "output_len": "16-256"},
        "model": {"dir": model_dir.name, "weight_bytes": weight_bytes, "dtype": "float32"},
        "copy_bandwidth_gbs": round(bandwidth, 2), "decode_floor_ms": round(floor_ms, 2),
        "decode_step_ms": {str(k): round(v, 2) for k, v in steps.items()},
        "results": results,
    }
    Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
