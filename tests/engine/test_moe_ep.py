"""Expert parallelism on CPU (gloo, one process per rank): greedy tokens equal `transformers` at EP=1, 2 and 4,
with both all2all backends and both placements; plus the placement rules (pure)."""

from __future__ import annotations

import pytest

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.expert_parallel import expert_owners, token_slices
from pypto_serving.engine.llm_engine import LLMEngine
from tests.engine.test_llm_engine import generate
from tests.engine.test_tp import _workload
from tests.support.models import hf_greedy, tiny_model_dir


def test_placements() -> None:
    assert expert_owners(8, 2, "linear") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_owners(8, 4, "round_robin") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert expert_owners(6, 4, "linear") == [0, 0, 1, 1, 2, 3]  # uneven: the first E % EP ranks hold one more
    assert expert_owners(6, 4, "round_robin") == [0, 1, 2, 3, 0, 1]
    assert expert_owners(3, 1, "linear") == [0, 0, 0]
    with pytest.raises(ValueError, match="3 experts cannot be sharded over 4 ranks"):
        expert_owners(3, 4, "linear")
    assert token_slices(5, 4) == [2, 1, 1, 1] and token_slices(1, 4) == [1, 0, 0, 0]


def _run_ep(model: str, tp: int, **ep: object) -> tuple[dict, dict]:
    prompts, max_tokens = _workload(seed=10)
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=256, block_size=8, max_num_batched_tokens=64,
                                    tensor_parallel_size=tp, cpu_threads=1, **ep))
    try:
        outputs = generate(engine, prompts, max_tokens)
        stats = engine.stats()
    finally:
        engine.shutdown()
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        assert outputs[f"r{i}"] == hf_greedy(model, prompt, n), f"request {i} differs"
    return outputs, stats


@pytest.mark.parametrize("backend", ["allgather_reducescatter", "alltoall"])
def test_ep1_both_backends(backend: str) -> None:
    _run_ep(str(tiny_model_dir("qwen3-moe")), 1, enable_expert_parallel=True, all2all_backend=backend)


def test_tp2_without_ep_splits_every_expert() -> None:
    _run_ep(str(tiny_model_dir("qwen2-moe")), 2)


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("backend", ["allgather_reducescatter", "alltoall"])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_ep_matches_transformers(ep_size: int, backend: str, placement: str) -> None:
    arch = "qwen3-moe" if (ep_size + len(backend) + len(placement)) % 2 else "qwen2-moe"  # both archs, spread
    _, stats = _run_ep(str(tiny_model_dir(arch)), ep_size, enable_expert_parallel=True, all2all_backend=backend,
                       expert_placement_strategy=placement)
    assert stats["prefix_cache_hits"] > 0
    assert all(len(c) == 8 and sum(c) > 0 for c in stats["moe_expert_tokens"].values())


def test_ep4_uneven_experts_and_fewer_tokens_than_ranks() -> None:
    """6 experts over 4 ranks (2, 2, 1, 1), and decode steps of one token: three ranks dispatch nothing."""
    model = str(tiny_model_dir("qwen3-moe", experts=6, seed=3))
    for backend in ("alltoall", "allgather_reducescatter"):
        engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=64, tensor_parallel_size=4, cpu_threads=1,
                                        enable_expert_parallel=True, all2all_backend=backend))
        try:
            prompt = [7, 300, 41, 9, 12]
            assert generate(engine, [prompt], [12])["r0"] == hf_greedy(model, prompt, 12)
        finally:
            engine.shutdown()


def test_ep_inside_each_pipeline_stage_matches_transformers() -> None:
    """PP=2 x TP=2 with EP: each stage's experts are sharded over that stage's TP group (not the whole world)."""
    _, stats = _run_ep(str(tiny_model_dir("qwen3-moe")), 2, pipeline_parallel_size=2, enable_expert_parallel=True,
                       all2all_backend="alltoall")
    assert stats["moe_expert_tokens"]  # the last stage's MoE layers
