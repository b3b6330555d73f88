"""Pipeline parallelism on CPU (gloo, one process per rank): greedy tokens equal transformers with several
micro-batches really in flight, aborts in flight return every KV block, and stage faults fail requests fast."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator

import pytest

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.pipeline import partition_layers
from pypto_serving.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import assert_matches_transformers, random_prompts
from tests.support.models import hf_greedy, tiny_model_dir

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def pp_engine(arch: str, pp: int, tp: int = 1, layers: int = 4, **overrides) -> LLMEngine:
    model = str(tiny_model_dir(arch, layers=layers))
    config = {"model": model, "pipeline_parallel_size": pp, "tensor_parallel_size": tp, "num_kv_blocks": 256,
              "block_size": 8, "max_num_batched_tokens": 64, "long_prefill_token_threshold": 24, "cpu_threads": 1,
              **overrides}
    return LLMEngine(EngineConfig(**config))


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int],
             prefix: str = "r") -> tuple[dict[str, list[int]], int]:
    """Submit all prompts at once and step until done: (tokens by request id, most micro-batches seen in flight)."""
    outputs: dict[str, list[int]] = {}
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"{prefix}{i}", prompt, SamplingParams(max_tokens=n, **GREEDY))
        outputs[f"{prefix}{i}"] = []
    most, deadline = 0, time.monotonic() + 300
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "generation did not finish"
        for out in engine.step():
            assert out.error is None, out.error
            outputs[out.request_id] += out.new_token_ids
        most = max(most, engine.stats()["pp_inflight_micro_batches"])
    return outputs, most


def _workload(seed: int) -> tuple[list[list[int]], list[int]]:
    """16 concurrent prompts of mixed lengths (several need chunked prefill), two with a repeated 40-token prefix."""
    prompts = random_prompts(14, (1, 120), seed=seed)
    shared = random_prompts(1, (40, 40), seed=seed + 1)[0]
    prompts += [[*shared, 5, 6], [*shared, 7]]
    return prompts, [random.Random(seed + i).randint(1, 24) for i in range(len(prompts))]


def test_partition_layers_even_uneven_and_invalid() -> None:
    assert partition_layers(4, 2) == [(0, 2), (2, 4)]
    assert partition_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert partition_layers(4, 3, "2,1,1") == [(0, 2), (2, 3), (3, 4)]
    assert partition_layers(4, 1) == [(0, 4)]
    for spec, message in [("2,1,2", "add up"), ("1,1,1,1", "has 4 stages"), ("4,0,0", "at least one layer"),
                          ("a,b,c", "comma-separated")]:
        with pytest.raises(ValueError, match=message):
            partition_layers(4, 3, spec)
    with pytest.raises(ValueError, match="3 stages for a model of 2 layers"):
        partition_layers(2, 3)


PARALLEL = [
    pytest.param("qwen3", 2, 1, None, id="qwen3-pp2"),
    pytest.param("llama", 2, 1, None, id="llama-pp2"),
    pytest.param("qwen2", 2, 1, None, id="qwen2-tied-pp2"),  # tied LM head: the last stage loads the embedding
    pytest.param("qwen3", 3, 1, "2,1,1", id="qwen3-pp3-uneven"),
    pytest.param("llama", 3, 1, "1,2,1", id="llama-pp3-uneven"),
    pytest.param("qwen3", 2, 2, None, id="qwen3-pp2xtp2"),
    pytest.param("llama", 2, 2, None, id="llama-pp2xtp2"),
]


@pytest.mark.parametrize(("arch", "pp", "tp", "partition"), PARALLEL)
def test_greedy_tokens_match_transformers(arch: str, pp: int, tp: int, partition: str | None) -> None:
    engine = pp_engine(arch, pp, tp, pp_layer_partition=partition)
    model = engine.config.model
    try:
        one = random_prompts(1, (37, 37), seed=1)
        outputs, _ = generate(engine, one, [20], prefix="one")
        assert_matches_transformers(model, one, [20], outputs, prefix="one")
        prompts, max_tokens = _workload(seed=10)
        outputs, most = generate(engine, prompts, max_tokens)
        assert most == pp  # every stage had its own micro-batch in flight
        assert_matches_transformers(model, prompts, max_tokens, outputs)
        hits = engine.stats()["prefix_cache_hits"]
        again, _ = generate(engine, [prompts[-1]], [max_tokens[-1]], prefix="again")  # its prefix is cached now
        assert again["again0"] == outputs[f"r{len(prompts) - 1}"]
        stats = engine.stats()
        assert stats["prefix_cache_hits"] - hits == 40
        assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"] and stats["pp_inflight_micro_batches"] == 0
        assert len(stats["pp_stage_idle_ratio"]) == pp and all(0 <= r < 1 for r in stats["pp_stage_idle_ratio"])
    finally:
        engine.shutdown()


def test_preemption_on_a_tiny_kv_pool() -> None:
    engine = pp_engine("qwen3", 2, block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    try:
        prompts = random_prompts(6, (10, 30), seed=4)
        max_tokens = [40, 35, 30, 25, 40, 20]
        outputs, most = generate(engine, prompts, max_tokens)
        assert most == 2 and engine.stats()["num_preemptions"] > 0
        assert_matches_transformers(engine.config.model, prompts, max_tokens, outputs)
        assert engine.block_manager.num_free_blocks == 24
    finally:
        engine.shutdown()


def test_blocking_mode_keeps_one_micro_batch_in_flight() -> None:
    engine = pp_engine("llama", 2, pp_blocking=True)
    try:
        prompts, max_tokens = _workload(seed=11)
        outputs, most = generate(engine, prompts[:6], max_tokens[:6])
        assert most == 1
        assert_matches_transformers(engine.config.model, prompts[:6], max_tokens[:6], outputs)
    finally:
        engine.shutdown()


def test_two_micro_batches_on_one_in_process_rank() -> None:
    """--max-num-micro-batches works without stages too: the runner thread queues the second micro-batch."""
    engine = pp_engine("qwen3", 1, max_num_micro_batches=2)
    try:
        prompts, max_tokens = _workload(seed=13)
        outputs, most = generate(engine, prompts, max_tokens)
        assert most == 2
        assert_matches_transformers(engine.config.model, prompts, max_tokens, outputs)
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def pp2() -> Iterator[LLMEngine]:
    engine = pp_engine("qwen3", 2, num_kv_blocks=128, max_num_batched_tokens=128)  # 64 per micro-batch
    yield engine
    engine.shutdown()


def test_aborts_of_in_flight_sequences_return_every_block(pp2: LLMEngine) -> None:
    """500 aborts, most of them of sequences whose micro-batch is on a stage; survivors still match transformers."""
    engine, rng = pp2, random.Random(7)
    prompts = random_prompts(40, (1, 60), seed=12)
    live: dict[str, tuple[list[int], int]] = {}
    tokens: dict[str, list[int]] = {}
    aborted = in_flight_aborts = n = 0
    deadline = time.monotonic() + 600
    while aborted < 500 or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"stuck after {aborted} aborts"
        while aborted + len(live) < 500 and len(live) < 12:
            prompt, max_tokens = prompts[n % len(prompts)], rng.randint(1, 30)
            engine.add_request(f"q{n}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
            live[f"q{n}"], tokens[f"q{n}"] = (prompt, max_tokens), []
            n += 1
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                prompt, max_tokens = live.pop(out.request_id)
                if rng.random() < 0.2:
                    assert tokens[out.request_id] == hf_greedy(engine.config.model, prompt, max_tokens)
        for request_id in [r for r in live if rng.random() < 0.3 and aborted < 500]:
            seq = engine._requests[request_id]
            in_flight_aborts += seq.in_flight
            engine.abort_request(request_id)
            del live[request_id]
            aborted += 1
    assert aborted == 500 and in_flight_aborts >= 100
    stats = engine.stats()
    assert stats["num_aborted"] == 500 and stats["num_failed"] == 0 and stats["pp_inflight_micro_batches"] == 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    assert engine.load()["kv_cache_usage"] == 0.0 and engine.load()["running"] == 0


def test_load_counts_sequences_in_flight(pp2: LLMEngine) -> None:
    engine, prompts = pp2, random_prompts(4, (20, 20), seed=32)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"load{i}", prompt, SamplingParams(max_tokens=10, **GREEDY))
    assert engine.load()["waiting"] == 4 and engine.load()["pending_tokens"] == 4 * 30
    engine.step()  # two micro-batches of two: the first came back (one token each) and went out again as decodes
    load = engine.load()
    assert (load["running"], load["waiting"]) == (4, 0) and load["kv_cache_usage"] > 0
    assert load["pending_tokens"] == 2 * 9 + 2 * 30  # tokens of a micro-batch in flight count when it is back
    assert engine.stats()["pp_inflight_micro_batches"] == 2
    while engine.has_unfinished_requests():
        engine.step()
    load = engine.load()
    assert (load["running"], load["pending_tokens"], load["kv_cache_usage"]) == (0, 0, 0.0)
    assert engine.stats()["pp_inflight_micro_batches"] == 0


def _stage_process(engine: LLMEngine, stage: int):
    return engine.executor.procs[stage * engine.config.tensor_parallel_size]


def test_a_hung_stage_times_out_its_micro_batches_then_the_engine_recovers(pp2: LLMEngine) -> None:
    engine, prompt = pp2, random_prompts(1, (12, 12), seed=30)[0]
    stage1 = _stage_process(engine, 1)
    engine.config.step_timeout_s = 2.0  # read at every step
    try:
        for i in range(4):
            engine.add_request(f"hung{i}", prompt, SamplingParams(max_tokens=8, **GREEDY))
        os.kill(stage1.pid, signal.SIGSTOP)
        started, outs = time.monotonic(), []
        while engine.has_unfinished_requests() and time.monotonic() - started < 15:
            outs += engine.step()
        assert 1.9 < time.monotonic() - started < 10
        assert sorted((o.request_id, o.finish_reason) for o in outs) == [(f"hung{i}", "error") for i in range(4)]
        assert all("timed out" in o.error for o in outs) and engine.is_healthy()
        os.kill(stage1.pid, signal.SIGCONT)
        outputs, _ = generate(engine, [prompt], [6], prefix="after")  # the late micro-batches are drained first
        assert outputs["after0"] == hf_greedy(engine.config.model, prompt, 6) and engine.is_healthy()
        assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    finally:
        os.kill(stage1.pid, signal.SIGCONT)
        engine.config.step_timeout_s = 120.0


def test_a_killed_stage_makes_the_engine_unhealthy_and_fails_every_request(pp2: LLMEngine) -> None:
    engine, prompt = pp2, random_prompts(1, (12, 12), seed=31)[0]
    for i in range(6):
        engine.add_request(f"doomed{i}", prompt, SamplingParams(max_tokens=200, **GREEDY))
    engine.step()
    assert engine.stats()["pp_inflight_micro_batches"] == 2
    stage1 = _stage_process(engine, 1)
    os.kill(stage1.pid, signal.SIGKILL)
    stage1.join(timeout=10)
    started, outs = time.monotonic(), []
    while engine.has_unfinished_requests() and time.monotonic() - started < 10:
        outs += engine.step()
    assert time.monotonic() - started < 5
    assert sorted((o.request_id, o.finish_reason) for o in outs if o.finished) == [
        (f"doomed{i}", "error") for i in range(6)]
    assert not engine.is_healthy() and not engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="cannot serve"):
        engine.add_request("late", prompt, SamplingParams())
    started = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - started < 20
    assert not any(p.is_alive() for p in engine.executor.procs)
