"""Greedy outputs of the engine equal `transformers` generation token for token (float32), per architecture.

Covers one request, 16 concurrent requests of mixed lengths, chunked prefill (tiny token budget and a per-request
chunk cap), preemption (tiny KV pool) and prefix-cache hits. EOS is ignored so every output has full length.
"""

from __future__ import annotations

import random

import pytest

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.sampling_params import SamplingParams
from tests.support.models import hf_greedy, tiny_model_dir

ARCHS = ["qwen3", "qwen2", "llama", "qwen3-moe", "qwen2-moe"]


def random_prompts(n: int, lengths: tuple[int, int], seed: int, vocab: int = 1000) -> list[list[int]]:
    """``n`` prompts of random token ids with lengths in ``lengths`` (inclusive)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int],
             prefix: str = "r") -> dict[str, list[int]]:
    """Submit all prompts at once (greedy, EOS ignored) and step until done; returns tokens by request id."""
    outputs: dict[str, list[int]] = {}
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(f"{prefix}{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        outputs[f"{prefix}{i}"] = []
    finished: dict[str, str] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.error is None, out.error
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert set(finished.values()) == {"length"} and len(finished) == len(prompts)
    return outputs


def assert_matches_transformers(model: str, prompts: list[list[int]], max_tokens: list[int],
                                outputs: dict[str, list[int]], prefix: str = "r") -> None:
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        got = outputs[f"{prefix}{i}"]
        assert len(got) == n
        assert got == hf_greedy(model, prompt, n), f"request {i} (prompt of {len(prompt)} tokens) differs"


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> str:
    return str(tiny_model_dir(request.param))


def _engine(model: str, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, **{"num_kv_blocks": 512, **overrides}))


def test_one_request(model: str) -> None:
    engine = _engine(model)
    try:
        prompts = random_prompts(1, (37, 37), seed=1)
        assert_matches_transformers(model, prompts, [40], generate(engine, prompts, [40]))
        assert engine.stats()["num_finished"] == 1
    finally:
        engine.shutdown()


def test_sixteen_concurrent_requests_of_mixed_lengths(model: str) -> None:
    engine = _engine(model, block_size=8)
    try:
        prompts = random_prompts(16, (1, 200), seed=2)
        max_tokens = [random.Random(i).randint(1, 40) for i in range(16)]
        outputs = generate(engine, prompts, max_tokens)
        assert_matches_transformers(model, prompts, max_tokens, outputs)
        # one forward per step for the whole batch: far fewer steps than tokens
        assert engine.stats()["num_steps"] <= max(max_tokens) + 2
    finally:
        engine.shutdown()


@pytest.mark.parametrize("budget", [{"max_num_batched_tokens": 16}, {"max_num_batched_tokens": 64,
                                                                       "long_prefill_token_threshold": 8}])
def test_chunked_prefill(model: str, budget: dict) -> None:
    engine = _engine(model, block_size=8, **budget)
    try:
        prompts = random_prompts(6, (20, 90), seed=3)
        max_tokens = [12, 5, 20, 8, 16, 3]
        outputs = generate(engine, prompts, max_tokens)
        assert_matches_transformers(model, prompts, max_tokens, outputs)
        stats = engine.stats()
        # every prompt token was computed in chunks no larger than the budget/cap
        assert stats["prompt_tokens_computed"] == sum(map(len, prompts))
        assert stats["num_steps"] >= sum(map(len, prompts)) // budget["max_num_batched_tokens"]
    finally:
        engine.shutdown()


def test_preemption_on_a_tiny_kv_pool(model: str) -> None:
    engine = _engine(model, block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    try:
        prompts = random_prompts(6, (10, 30), seed=4)
        max_tokens = [40, 35, 30, 25, 40, 20]
        outputs = generate(engine, prompts, max_tokens)
        assert engine.stats()["num_preemptions"] > 0
        assert_matches_transformers(model, prompts, max_tokens, outputs)
        assert engine.block_manager.num_free_blocks == 24
    finally:
        engine.shutdown()


def test_repeated_prefixes_hit_the_cache(model: str) -> None:
    engine = _engine(model, block_size=8)
    try:
        shared = random_prompts(1, (40, 40), seed=5)[0]
        first = generate(engine, [[*shared, 11, 12, 13]], [10], prefix="first")
        assert engine.stats()["prefix_cache_hits"] == 0
        prompts = [shared + suffix for suffix in random_prompts(4, (1, 20), seed=6)] + [[*shared, 11, 12, 13]]
        max_tokens = [10, 12, 6, 9, 10]
        outputs = generate(engine, prompts, max_tokens)
        stats = engine.stats()
        assert stats["prefix_cache_hits"] >= 5 * 40
        assert stats["prefix_cache_queries"] == len(shared) + 3 + sum(map(len, prompts))
        assert outputs["r4"] == first["first0"]
        assert_matches_transformers(model, prompts, max_tokens, outputs)
    finally:
        engine.shutdown()
