"""DP+EP lockstep (engine/data_parallel.py): engines that share a MoE model's experts, one per DP rank.

Real engine processes on the tiny Qwen3-MoE / Qwen2-MoE, gloo on cpu: greedy tokens equal transformers on every
rank, one request alone does not hang the group, a rank that dies makes the others unhealthy within seconds and
fails their requests, and a group started again with the same flags serves again. The metadata exchange is one
all-reduce per step (a unit test with a fake collective).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pypto_serving.contract import LoadReport
from pypto_serving.engine import data_parallel
from pypto_serving.engine import device as devices
from pypto_serving.engine.config import EngineConfig
from tests.support.common import free_port, wait_for
from tests.support.engines import EngineLauncher, EngineProcess
from tests.support.models import hf_greedy, tiny_model_dir

BASE_ARGS = ["--device", "cpu", "--enable-expert-parallel", "--max-model-len", "256", "--cpu-threads", "1"]
PROMPTS = [[17, 250, 3, 99, 640, 12, 7, 401], [5, 6, 7, 8], [900, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                                                16, 17, 18, 19], [333, 444]]


def start_group(launcher: EngineLauncher, model_dir, dp: int, extra: list[str], rpc_port: int | None = None,
                ranks: list[int] | None = None) -> list[EngineProcess]:
    """Launch DP ranks ``ranks`` (default: all) of a group of ``dp`` engines and wait until all are ready."""
    rpc_port = rpc_port or free_port()
    engines = [launcher(model_dir, wait=False, extra_args=[
        *BASE_ARGS, *extra, "--data-parallel-size", str(dp), "--data-parallel-rank", str(rank),
        "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port)])
        for rank in (range(dp) if ranks is None else ranks)]
    for engine in engines:
        engine.wait_ready()
    return engines


def greedy(engine: EngineProcess, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    response = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [int(t.removeprefix("token_id:")) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


def counter(engine: EngineProcess, name: str) -> float:
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


# ------------------------------------------------------------------ pure logic


def test_step_metadata_is_one_packed_all_reduce(monkeypatch) -> None:
    """Each DP rank's tokens and 'any rank has more work' come back from ONE all-reduce (MAX) per step."""
    peer = torch.tensor([0, 0, 7, 0, 1])  # what DP rank 2 (7 tokens, more work) contributes in a group of 4
    calls = []

    def fake_all_reduce(x, group=None, op="sum"):
        calls.append(op)
        return x.copy_(torch.maximum(x, peer))

    monkeypatch.setattr(devices, "all_reduce", fake_all_reduce)
    meta = data_parallel.exchange_step_meta(3, False, 0, 4, torch.device("cpu"))
    assert calls == ["max"]
    assert meta == data_parallel.StepMeta([3, 0, 7, 0], True)
    calls.clear()
    peer.zero_()
    assert data_parallel.exchange_step_meta(1, False, 1, 4, torch.device("cpu")).busy is False
    assert calls == ["max"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"data_parallel_size": 2}, "data_parallel_size: DP ranks of one engine group step in lockstep"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True, "pipeline_parallel_size": 2},
     "pipeline_parallel_size > 1 is not supported"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True, "data_parallel_rank": 2}, "data_parallel_rank"),
    ({"data_parallel_size": 0}, "data_parallel_size: must be a positive integer"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True, "data_parallel_rpc_port": 70000},
     "data_parallel_rpc_port"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True, "max_num_micro_batches": 2},
     "max_num_micro_batches"),
])
def test_config_rejects_unsupported_dp_shapes(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="/m", **kwargs)


def test_load_report_carries_the_dp_rank() -> None:
    report = LoadReport.parse({"running": 1, "dp_rank": 1, "dp_size": 2})
    assert (report.dp_rank, report.dp_size) == (1, 2)
    with pytest.raises(ValueError, match="dp_size"):
        LoadReport.parse({"dp_size": 0})


# ------------------------------------------------------------------ real engine groups


SMALL_POOL = ["--num-kv-blocks", "12", "--block-size", "16", "--max-num-batched-tokens", "16"]


@pytest.mark.parametrize(("arch", "dp", "extra"), [
    ("qwen3-moe", 2, ["--all2all-backend", "allgather_reducescatter", *SMALL_POOL]),
    ("qwen2-moe", 2, ["--tensor-parallel-size", "2", "--all2all-backend", "alltoall",
                      "--expert-placement-strategy", "round_robin"]),
    ("qwen3-moe", 4, ["--all2all-backend", "alltoall"]),
], ids=["dp2-tp1-allgather-small-pool", "dp2-tp2-alltoall-round-robin", "dp4-tp1-alltoall"])
def test_dp_group_serves_transformers_tokens_on_every_rank(engine_factory, arch, dp, extra) -> None:
    model_dir = tiny_model_dir(arch)
    engines = start_group(engine_factory, model_dir, dp, extra)
    loads = [LoadReport.parse(httpx.get(f"{e.url}/load", timeout=10).json()) for e in engines]
    assert [(r.dp_rank, r.dp_size) for r in loads] == [(rank, dp) for rank in range(dp)]
    expected = {i: hf_greedy(model_dir, p, 10) for i, p in enumerate(PROMPTS)}
    # one request alone, on the last rank: every other rank steps dummy batches and nothing hangs
    assert greedy(engines[-1], model_dir.name, PROMPTS[0], 10) == expected[0]
    assert counter(engines[0], "pypto:dp_dummy_steps") > 0
    # concurrent requests spread over every rank
    jobs = [(engines[i % dp], i % len(PROMPTS)) for i in range(2 * dp)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: greedy(job[0], model_dir.name, PROMPTS[job[1]], 10), jobs))
    assert results == [expected[p] for _, p in jobs]
    if "--num-kv-blocks" not in extra:
        return
    # a small KV pool and token budget on each rank: chunked prefill, preemption by recompute and prefix-cache hits
    # happen inside the lockstep group, and every token still equals transformers
    prompt = list(range(100, 140))  # 40 tokens: 3 prefill chunks; the 2 full blocks are cached for the next ones
    long = hf_greedy(model_dir, prompt, 24)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: greedy(engines[i % 2], model_dir.name, prompt, 24), range(12)))
    assert results == [long] * 12
    assert sum(counter(e, "vllm:num_preemptions") for e in engines) > 0
    assert all(counter(e, "vllm:prefix_cache_hits") > 0 for e in engines)


def test_a_dead_rank_breaks_the_group_and_a_restarted_group_serves(engine_factory) -> None:
    model_dir = tiny_model_dir("qwen3-moe")
    rpc_port = free_port()
    engines = start_group(engine_factory, model_dir, 2, [], rpc_port)
    body = {"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{engines[0].url}/v1/completions",
                                                           json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # the request is running
        engines[1].proc.kill()
        killed = time.monotonic()
        rest = "\n".join(lines)  # the stream ends (with an error), it does not hang
    assert "error" in rest and "[DONE]" in rest
    wait_for(lambda: httpx.get(f"{engines[0].url}/health", timeout=5).status_code == 503, 30,
             "DP rank 0 reports unhealthy after rank 1 died")
    assert time.monotonic() - killed < 30
    refused = httpx.post(f"{engines[0].url}/v1/completions", json={**body, "stream": False}, timeout=30)
    assert refused.status_code == 503
    # the group is restarted whole, with the same flags: it rejoins a fresh store and serves
    engines[0].stop()
    engines = start_group(engine_factory, model_dir, 2, [], rpc_port)
    expected = hf_greedy(model_dir, PROMPTS[1], 8)
    assert [greedy(e, model_dir.name, PROMPTS[1], 8) for e in engines] == [expected, expected]
