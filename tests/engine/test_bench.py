"""`pypto-serving bench`: datasets fixed by the seed, statistics, and real runs against a real engine (library and
CLI), without importing torch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pypto_serving.engine.bench import BenchConfig, length_range, make_dataset, percentiles, run_benchmark
from tests.support.common import REPO_ROOT
from tests.support.engines import EngineProcess


def config(**fields: object) -> BenchConfig:
    return BenchConfig(base_url="http://unused", model="m", **fields)  # type: ignore[arg-type]


def test_bench_does_not_import_torch():
    code = "import sys, pypto_serving.engine.bench as b; b.main(['--help']) if False else None; " \
           "sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=60).returncode == 0


def test_length_specs():
    assert length_range("100", 0.0) == (100, 100)
    assert length_range("100", 0.25) == (75, 125)
    assert length_range("8:64", 0.9) == (8, 64)
    with pytest.raises(ValueError):
        length_range("0", 0.0)
    with pytest.raises(ValueError):
        length_range("9:3", 0.0)


def test_random_dataset_is_fixed_by_the_seed(tiny_qwen3_dir: Path):
    a = make_dataset(config(num_prompts=20, random_input_len="20:40", random_output_len="5:9", seed=3,
                            tokenizer=str(tiny_qwen3_dir)))
    b = make_dataset(config(num_prompts=20, random_input_len="20:40", random_output_len="5:9", seed=3,
                            tokenizer=str(tiny_qwen3_dir)))
    c = make_dataset(config(num_prompts=20, random_input_len="20:40", random_output_len="5:9", seed=4,
                            tokenizer=str(tiny_qwen3_dir)))
    assert a == b and a != c
    assert all(5 <= r.output_len <= 9 for r in a)
    assert all(15 <= r.prompt_len <= 40 for r in a)  # re-encoding decoded random ids may merge a few tokens


def test_shared_prefix_dataset_groups_prompts():
    requests = make_dataset(config(dataset="shared-prefix", num_prompts=12, shared_prefix_groups=3,
                                   shared_prefix_len=50, shared_suffix_len=5, seed=1))
    prefixes = {r.prompt[:150] for r in requests}
    assert len(requests) == 12 and len(prefixes) == 3
    assert len({r.prompt for r in requests}) == 12


def test_percentiles():
    stats = percentiles([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_run_benchmark_against_a_real_engine(tiny_engine: EngineProcess, tiny_qwen3_dir: Path, endpoint: str):
    result = run_benchmark(base_url=tiny_engine.url, model=tiny_qwen3_dir.name, endpoint=endpoint, num_prompts=8,
                           max_concurrency=4, random_input_len="24", random_output_len="8",
                           tokenizer=str(tiny_qwen3_dir), progress=False)
    assert (result["completed"], result["errors"]) == (8, 0), result["error_samples"]
    assert result["total_output_tokens"] == 64  # ignore_eos: exact output lengths, counted by the server
    assert result["total_input_tokens"] >= 8 * 20
    assert result["output_throughput"] > 0 and result["request_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < result[name]["p50"] <= result[name]["p99"], name
    assert result["ttft_ms"]["p99"] <= result["e2e_ms"]["p99"]


def test_poisson_arrivals_follow_the_rate(tiny_engine: EngineProcess, tiny_qwen3_dir: Path):
    rng = random.Random(5 + 1)  # the arrival process is seeded with seed + 1
    arrivals_span = sum(rng.expovariate(20.0) for _ in range(5))  # 6 requests: 5 gaps
    result = run_benchmark(base_url=tiny_engine.url, model=tiny_qwen3_dir.name, num_prompts=6, request_rate=20.0,
                           random_input_len="8", random_output_len="2", seed=5, progress=False)
    assert result["completed"] == 6
    assert result["duration_s"] >= arrivals_span


def test_errors_are_counted_not_fatal(tiny_engine: EngineProcess):
    result = run_benchmark(base_url=tiny_engine.url, model="no-such-model", num_prompts=3, random_input_len="4",
                           random_output_len="2", progress=False)
    assert (result["completed"], result["errors"]) == (0, 3)
    assert "404" in result["error_samples"][0]


def test_cli_writes_json(tiny_engine: EngineProcess, tiny_qwen3_dir: Path, tmp_path: Path):
    out = tmp_path / "result.json"
    run = subprocess.run([str(REPO_ROOT / ".venv/bin/pypto-serving"), "bench", "--base-url", f"{tiny_engine.url}/v1",
                          "--model", tiny_qwen3_dir.name, "--num-prompts", "4", "--max-concurrency", "2",
                          "--dataset", "shared-prefix", "--shared-prefix-groups", "2", "--shared-prefix-len", "40",
                          "--shared-suffix-len", "4", "--random-output-len", "3", "--header", "x-session-id=bench",
                          "--json-out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    assert "output throughput" in run.stdout and "TTFT" in run.stdout
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and saved["total_output_tokens"] == 12
    assert saved["config"]["headers"] == {"x-session-id": "bench"} and saved["config"]["request_rate"] == "inf"
    bad = subprocess.run([str(REPO_ROOT / ".venv/bin/pypto-serving"), "bench", "--base-url", tiny_engine.url,
                          "--model", "m", "--header", "novalue"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "K=V" in bad.stderr
