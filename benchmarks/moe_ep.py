"""MoE expert parallelism on CPU: a small Qwen3-MoE, 64 mixed requests, EP=2 (both all2all backends) vs EP=1.

Every contender is an offline `LLMEngine` (no HTTP) fed the same 64 requests at once (greedy, EOS ignored), one
after the other, one torch thread per rank, in ``--rounds`` rounds (each contender's fastest round is kept: the
machine's cores are shared); their greedy outputs must be identical. Contenders: EP=1
(TP=1, 1 thread), EP=1 with 2 threads (the same cores as two ranks), TP=2 without EP (every expert split over the
two ranks), and EP=2 (TP=2 + --enable-expert-parallel) with allgather_reducescatter and alltoall. The per-step
cost of the EP collectives is measured separately on two gloo processes: the exact collectives one MoE layer issues
for a step of T tokens, times the model's MoE layers. Writes docs/benchmarks/moe_ep.json.

    .venv/bin/python benchmarks/moe_ep.py [--requests 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULT = REPO_ROOT / "docs" / "benchmarks" / "moe_ep.json"
SIZES = {"layers": 4, "hidden": 256, "heads": 8, "kv_heads": 4, "intermediate": 512, "vocab": 2048, "experts": 16,
         "top_k": 4, "moe_intermediate": 256}
CONTENDERS = {
    "ep1": {"tensor_parallel_size": 1, "cpu_threads": 1},
    "ep1_2threads": {"tensor_parallel_size": 1, "cpu_threads": 2},
    "tp2_no_ep": {"tensor_parallel_size": 2, "cpu_threads": 1},
    "ep2_allgather_reducescatter": {"tensor_parallel_size": 2, "cpu_threads": 1, "enable_expert_parallel": True,
                                    "all2all_backend": "allgather_reducescatter"},
    "ep2_alltoall": {"tensor_parallel_size": 2, "cpu_threads": 1, "enable_expert_parallel": True,
                     "all2all_backend": "alltoall"},
}


def log(message: str) -> None:
    print(f"[moe_ep] {message}", flush=True)


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n`` requests: prompts of 16-256 random token ids, 8-64 output tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 2000) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    return prompts, [rng.randint(8, 64) for _ in range(n)]


def run_engine(model: str, prompts: list[list[int]], max_tokens: list[int], **config: object) -> dict:
    import psutil

    from benchmarks.engine_vs_transformers import cpu_seconds
    from pypto_serving.engine.config import EngineConfig
    from pypto_serving.engine.llm_engine import LLMEngine
    from pypto_serving.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_kv_blocks=2048, max_num_batched_tokens=1024,
                                    **config))
    try:
        outputs: dict[str, list[int]] = {}
        started, cpu_started = time.monotonic(), cpu_seconds(psutil.Process())
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            outputs[str(i)] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.error is None, out.error
                outputs[out.request_id] += out.new_token_ids
        wall, cpu = time.monotonic() - started, cpu_seconds(psutil.Process()) - cpu_started
        stats = engine.stats()
    finally:
        engine.shutdown()
    counts = stats["moe_expert_tokens"]
    per_expert = [sum(layer[e] for layer in counts.values()) for e in range(SIZES["experts"])]
    steps = stats["num_steps"]
    return {"wall_s": round(wall, 2), "steps": steps, "step_ms": round(1000 * wall / steps, 1),
            "cpu_s": round(cpu, 2), "output_tok_per_s": round(sum(max_tokens) / wall, 1),
            "output_tok_per_cpu_s": round(sum(max_tokens) / cpu, 1),
            "total_tok_per_s": round((sum(max_tokens) + sum(map(len, prompts))) / wall, 1),
            "expert_load_max_over_mean": round(max(per_expert) / statistics.mean(per_expert), 2),
            "outputs": outputs}


def _collectives_rank(rank: int, port: int, tokens: list[int], hidden: int, top_k: int, out: dict) -> None:
    """Time one MoE layer's collectives per backend for steps of ``tokens`` tokens (rank 0 reports)."""
    import torch
    import torch.distributed as dist

    from pypto_serving.engine import device

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for t in tokens:
        x = torch.randn(t, hidden)
        times = {"allgather_reducescatter": [], "alltoall": []}
        for _ in range(30):
            dist.barrier()
            start = time.perf_counter()
            device.all_reduce(x.clone())
            times["allgather_reducescatter"].append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            mine = t // 2 + (rank < t % 2)
            pairs = mine * top_k
            send = [pairs // 2, pairs - pairs // 2]
            counts = device.all_to_all(torch.tensor(send), [1, 1], [1, 1]).tolist()
            rows = device.all_to_all(torch.randn(pairs, hidden), send, counts)
            device.all_to_all(torch.randint(0, 8, (pairs,)), send, counts)
            device.all_to_all(rows, counts, send)
            device.all_gather(torch.randn(-(-t // 2), hidden))
            times["alltoall"].append(time.perf_counter() - start)
        result[t] = {k: round(1e3 * statistics.median(v[5:]), 3) for k, v in times.items()}
    if rank == 0:
        out.update(result)
    dist.destroy_process_group()


def on_two_gloo_ranks(target, *args: object) -> dict:
    """Run ``target(rank, port, *args, out)`` on two spawned processes (a gloo pair); what rank 0 put in ``out``."""
    import multiprocessing as mp

    from tests.support.common import free_port

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port("127.0.0.1")
        procs = [ctx.Process(target=target, args=(r, port, *args, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        return {str(k): v for k, v in out.items()}


def collectives(tokens: list[int], hidden: int, top_k: int) -> dict:
    return on_two_gloo_ranks(_collectives_rank, tokens, hidden, top_k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pypto_serving.engine.tiny_model import write_tiny_model

    prompts, max_tokens = workload(args.requests)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        model = str(write_tiny_model(Path(tmp) / "m", "qwen3-moe", seed=1, **SIZES))
        weight_bytes = (Path(model) / "model.safetensors").stat().st_size
        for round_ in range(args.rounds):
            for name, config in CONTENDERS.items():
                log(f"round {round_ + 1}/{args.rounds} {name}: {config}")
                result = run_engine(model, prompts, max_tokens, **config)
                log(f"{name}: {result['wall_s']} s, {result['output_tok_per_s']} output tok/s")
                if name not in results or result["wall_s"] < results[name]["wall_s"]:
                    results[name] = result
    reference = results["ep1"]["outputs"]
    identical = all(r.pop("outputs") == reference for r in results.values())
    base, base_cpu = results["ep1"]["wall_s"], results["ep1"]["cpu_s"]
    for r in results.values():
        r["speedup_vs_ep1"] = round(base / r["wall_s"], 2)
        r["cpu_efficiency_vs_ep1"] = round(base_cpu / r["cpu_s"], 2)
    log("timing the EP collectives of one MoE layer on two gloo ranks")
    sync = collectives([64, 1024], SIZES["hidden"], SIZES["top_k"])
    data = {"model": {"arch": "qwen3-moe", **SIZES, "weight_bytes": weight_bytes},
            "workload": {"requests": args.requests, "prompt_len": "16-256", "output_len": "8-64",
                         "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(max_tokens)},
            "rounds": args.rounds, "results": results, "outputs_identical": identical, "collectives_ms_per_layer": sync,
            "moe_layers": SIZES["layers"]}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {RESULT} (outputs identical: {identical})")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
