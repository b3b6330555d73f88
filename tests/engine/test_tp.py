"""Tensor parallelism on CPU (gloo, one process per rank): same greedy tokens as TP=1, and worker faults."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import generate, random_prompts
from tests.support.models import hf_greedy, tiny_model_dir


def _workload(seed: int) -> tuple[list[list[int]], list[int]]:
    prompts = random_prompts(8, (1, 120), seed=seed)
    shared = prompts[0][:1] + random_prompts(1, (40, 40), seed=seed + 1)[0]
    prompts += [[*shared, 5, 6], [*shared, 7]]  # a repeated prefix
    return prompts, [random.Random(seed + i).randint(1, 24) for i in range(len(prompts))]


def _tp1_and_tp2(model: str, prompts: list[list[int]], max_tokens: list[int]) -> tuple[dict, dict, dict]:
    config = {"model": model, "num_kv_blocks": 256, "block_size": 8, "max_num_batched_tokens": 64}
    outs, stats = [], {}
    for tp in (1, 2):
        engine = LLMEngine(EngineConfig(**config, tensor_parallel_size=tp))
        try:
            outs.append(generate(engine, prompts, max_tokens))
            stats = engine.stats()
        finally:
            engine.shutdown()
    return outs[0], outs[1], stats


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_tp2_matches_tp1_and_transformers(arch: str) -> None:
    model = str(tiny_model_dir(arch))
    prompts, max_tokens = _workload(seed=10)
    tp1, tp2, stats = _tp1_and_tp2(model, prompts, max_tokens)
    assert tp2 == tp1
    assert stats["prefix_cache_hits"] > 0
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        assert tp2[f"r{i}"] == hf_greedy(model, prompt, n)


def test_tp2_replicated_kv_heads_and_padded_vocab() -> None:
    """One kv head shared by both ranks; a vocabulary (1001) that does not split evenly."""
    model = str(tiny_model_dir("qwen3", heads=4, kv_heads=1, vocab=1001, seed=7))
    prompts, max_tokens = _workload(seed=20)
    tp1, tp2, _ = _tp1_and_tp2(model, prompts, max_tokens)
    assert tp2 == tp1
    assert tp2["r3"] == hf_greedy(model, prompts[3], max_tokens[3])


def _run_one(engine: LLMEngine, request_id: str, prompt: list[int], n: int) -> list[int]:
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        for out in engine.step():
            assert out.error is None, out.error
            tokens += out.new_token_ids
    return tokens


def test_hung_worker_times_out_the_batch_then_recovers_and_a_dead_worker_makes_health_false() -> None:
    model = str(tiny_model_dir("llama"))
    engine = LLMEngine(EngineConfig(model=model, tensor_parallel_size=2, num_kv_blocks=64))
    rank1 = engine.executor.procs[1]
    prompt = random_prompts(1, (12, 12), seed=30)[0]
    try:
        assert _run_one(engine, "warm", prompt, 4) == hf_greedy(model, prompt, 4)
        # a hung rank: the step times out, only its batch fails, the engine stays healthy while it may recover
        engine.config.step_timeout_s = 2.0  # read at every step
        os.kill(rank1.pid, signal.SIGSTOP)
        engine.add_request("hung", prompt, SamplingParams(max_tokens=4, temperature=0.0))
        started = time.monotonic()
        outs = engine.step()
        assert 1.9 < time.monotonic() - started < 10
        assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("hung", True, "error")]
        assert "timed out" in outs[0].error
        assert engine.is_healthy() and not engine.has_unfinished_requests()
        os.kill(rank1.pid, signal.SIGCONT)
        # the late step is drained first, then new work runs normally
        assert _run_one(engine, "after", prompt, 6) == hf_greedy(model, prompt, 6)
        assert engine.is_healthy()
        # a dead rank: every request fails at once, health goes false, shutdown does not hang
        engine.add_request("doomed", prompt, SamplingParams(max_tokens=50, temperature=0.0))
        engine.step()
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(timeout=10)
        assert not engine.is_healthy()
        with pytest.raises(RuntimeError, match="cannot serve: a worker exited"):  # refused before any step saw it
            engine.add_request("early", prompt, SamplingParams())
        started = time.monotonic()
        outs = engine.step()
        assert time.monotonic() - started < 5
        assert [(o.request_id, o.finish_reason) for o in outs] == [("doomed", "error")]
        assert not engine.has_unfinished_requests()
        with pytest.raises(RuntimeError):
            engine.add_request("late", prompt, SamplingParams())
    finally:
        started = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - started < 20
    assert not any(p.is_alive() for p in engine.executor.procs)
