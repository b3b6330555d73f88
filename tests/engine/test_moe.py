"""MoE models against `transformers`: the router (logits, top-k ids and weights), half precision, the per-expert
token counters, and the loader's expert map. Greedy equality for one request, 16 concurrent, chunked prefill,
preemption and prefix hits runs in test_llm_engine.py / test_model.py (their ARCHS include both MoE archs)."""

from __future__ import annotations

import pytest
import torch

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.moe import FusedMoE
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.metrics import EngineCollector
from pypto_serving.engine.model_runner import ModelRunner, StepInput
from tests.engine.test_llm_engine import generate, random_prompts
from tests.support.models import hf_model, tiny_model_dir

MOE_ARCHS = ["qwen3-moe", "qwen2-moe"]
PROMPT = [(11 * i + 5) % 1000 + 5 for i in range(40)]


def _forward(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    step = StepInput(0, ids, [len(ids)], [len(ids)], [list(range(-(-len(ids) // runner.block_size)))], [], None)
    with torch.inference_mode():
        input_ids, positions, meta, _ = runner.prepare(step)
        return runner.model.compute_logits(runner.model(input_ids, positions, meta))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_logits_and_top_k_match_transformers(arch: str) -> None:
    path = str(tiny_model_dir(arch))
    runner = ModelRunner(EngineConfig(model=path, num_kv_blocks=16, block_size=16), "cpu", 4096)
    hf = hf_model(path)
    ours: dict[int, tuple] = {}
    theirs: dict[int, tuple] = {}
    hooks = []
    for i, (layer, hf_layer) in enumerate(zip(runner.model.model.layers, hf.model.layers, strict=True)):
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: ours.__setitem__(i, out)))
        hooks.append(hf_layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: theirs.__setitem__(i, out)))
    try:
        _forward(runner, PROMPT)
        with torch.inference_mode():
            hf(torch.tensor([PROMPT]))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(ours) == sorted(theirs) == [0, 1]
    for i in ours:
        (logits, weights, ids), (ref_logits, ref_weights, ref_ids) = ours[i], theirs[i]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
        if arch == "qwen3-moe":  # norm_topk_prob: the chosen experts' weights sum to one
            torch.testing.assert_close(weights.sum(-1), torch.ones(len(PROMPT)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_half_precision_runs_close_to_float32(arch: str, dtype: str) -> None:
    path = str(tiny_model_dir(arch))
    runner = ModelRunner(EngineConfig(model=path, num_kv_blocks=16, block_size=16, dtype=dtype), "cpu", 4096)
    moe = runner.model.model.layers[0].mlp
    assert isinstance(moe, FusedMoE) and moe.experts.w13_weight.dtype == getattr(torch, dtype)
    got = _forward(runner, PROMPT).float()
    ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (got - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_expert_token_counts_reach_stats_and_metrics() -> None:
    path = str(tiny_model_dir("qwen3-moe"))
    engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=128, block_size=8))
    try:
        prompts = random_prompts(4, (5, 30), seed=8)
        generate(engine, prompts, [6, 3, 9, 1])
        counts = engine.stats()["moe_expert_tokens"]
    finally:
        engine.shutdown()
    # every computed token is routed to top_k = 2 experts in each of the 2 layers (the last sampled token is not
    # fed back, hence -1 per request)
    tokens = sum(map(len, prompts)) + (6 + 3 + 9 + 1) - 4
    assert sorted(counts) == [0, 1] and all(len(c) == 8 and sum(c) == 2 * tokens for c in counts.values())
    assert sum(n > 0 for n in counts[0]) >= 4  # the random router spreads tokens over the experts
    families = {f.name: f for f in EngineCollector("m", lambda: ({}, {"moe_expert_tokens": counts}),
                                                   lambda: False).collect()}
    samples = families["pypto:moe_expert_tokens"].samples
    assert len(samples) == 16 and {s.name for s in samples} == {"pypto:moe_expert_tokens_total"}
    assert {(s.labels["layer"], s.labels["expert"]): s.value for s in samples}[("1", "3")] == counts[1][3]
    dense = {f.name for f in EngineCollector("m", lambda: ({}, {}), lambda: False).collect()}
    assert "pypto:moe_expert_tokens" not in dense


def test_expert_parallel_on_a_dense_model_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"enable_expert_parallel: .*Qwen3ForCausalLM.* has no MoE layers"):
        ModelRunner(EngineConfig(model=str(tiny_model_dir("qwen3")), num_kv_blocks=8, enable_expert_parallel=True),
                    "cpu", 4096)


def test_mlp_only_layers_stay_dense(tmp_path) -> None:
    """A config with ``mlp_only_layers`` (a dense MLP in layer 0) loads and matches transformers."""
    import json
    import shutil

    src = tiny_model_dir("qwen2-moe")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["mlp_only_layers"] = [0]
    cfg["intermediate_size"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("model.layers.0.mlp.")}
    gen = torch.Generator().manual_seed(1)
    for name, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
        weights[f"model.layers.0.mlp.{name}.weight"] = torch.randn(*shape, generator=gen) * 0.1
    save_file(weights, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    path = str(tmp_path / "m")
    runner = ModelRunner(EngineConfig(model=path, num_kv_blocks=16, block_size=16), "cpu", 4096)
    assert not isinstance(runner.model.model.layers[0].mlp, FusedMoE)
    assert [i for i, _ in runner.model.moe_layers()] == [1]
    ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(_forward(runner, PROMPT), ref, rtol=1e-4, atol=1e-4)
