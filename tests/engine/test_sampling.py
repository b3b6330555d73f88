"""Sampling: top-k / top-p / min-p supports and frequencies, penalties, bans, seeds, logprobs; then the engine."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.sampler import Sampler, SamplingBatch
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.sampling_params import SamplingParamError, SamplingParams
from tests.engine.test_llm_engine import random_prompts
from tests.support.models import hf_greedy, hf_model, tiny_model_dir

PROBS = [0.5, 0.3, 0.15, 0.05]


def batch(rows: int, **overrides) -> SamplingBatch:
    fields = {"temperatures": 1.0, "top_ps": 1.0, "top_ks": 0, "min_ps": 0.0, "seeds": None,
              "output_positions": 0, "logprobs": -1}
    per_row = {}
    for k, default in fields.items():
        value = overrides.pop(k, default)
        per_row[k] = value if isinstance(value, list) else [value] * rows
    return SamplingBatch(**per_row, **overrides)


def frequencies(rows: int = 4000, **settings) -> dict[int, float]:
    logits = torch.tensor(PROBS).log().repeat(rows, 1)
    tokens = Sampler(seed=1, device=torch.device("cpu"))(logits, batch(rows, **settings)).token_ids
    return {t: c / rows for t, c in Counter(tokens).items()}


def assert_distribution(freq: dict[int, float], expected: list[float]) -> None:
    for token, p in enumerate(expected):
        assert abs(freq.get(token, 0.0) - p) < 0.035, (token, freq, expected)


def renormalized(keep: list[int]) -> list[float]:
    total = sum(PROBS[i] for i in keep)
    return [PROBS[i] / total if i in keep else 0.0 for i in range(len(PROBS))]


def test_plain_sampling_follows_the_distribution() -> None:
    assert_distribution(frequencies(), PROBS)


def test_temperature_sharpens_and_flattens() -> None:
    for t in (0.5, 2.0):
        scaled = [p ** (1 / t) for p in PROBS]
        assert_distribution(frequencies(temperatures=t), [s / sum(scaled) for s in scaled])


@pytest.mark.parametrize(("settings", "keep"), [
    ({"top_ks": 2}, [0, 1]),
    ({"top_ps": 0.7}, [0, 1]),  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    ({"top_ps": 0.5}, [0]),
    ({"top_ps": 0.9}, [0, 1, 2]),
    ({"min_ps": 0.2}, [0, 1, 2]),  # threshold 0.1
    ({"min_ps": 0.7}, [0]),
    ({"top_ks": 3, "top_ps": 0.8}, [0, 1]),
])
def test_truncation_keeps_exactly_the_allowed_tokens(settings: dict, keep: list[int]) -> None:
    freq = frequencies(**settings)
    assert set(freq) == set(keep)
    assert_distribution(freq, renormalized(keep))


def _full_sort_truncation(probs: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """The definition: sort the whole vocabulary, keep the top k, then the smallest nucleus of what k kept."""
    vocab = probs.shape[1]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.tensor([k if k > 0 else vocab for k in top_ks])
    sorted_p = sorted_p.masked_fill(ranks >= k[:, None], 0.0)
    p = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps])
    drop = sorted_p.cumsum(dim=-1) - sorted_p >= p[:, None] * sorted_p.sum(dim=-1, keepdim=True)
    drop[:, 0] = False
    return probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 12.0])  # flat (the nucleus spans most of the vocabulary) to peaked
def test_top_k_top_p_candidates_equal_the_full_sort(sharpness: float) -> None:
    from pypto_serving.engine.layers.sampler import _top_k_top_p

    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, 5000, generator=gen) * sharpness, dim=-1)
    top_ks, top_ps = [0, 5, 0, 300, 1, 0], [0.9, 1.0, 0.5, 0.95, 0.3, 0.999]
    cand, ids = _top_k_top_p(probs, top_ks, top_ps, start=16)
    got = torch.zeros_like(probs).scatter(1, ids, cand)
    torch.testing.assert_close(got, _full_sort_truncation(probs, top_ks, top_ps), rtol=0, atol=0)


def test_greedy_is_argmax_and_bans_apply() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0], [9.0, 1.0, 2.0]])
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    assert sampler(logits.clone(), batch(2, temperatures=0.0)).token_ids == [1, 0]
    banned = batch(2, temperatures=0.0, banned=[[1], []])
    assert sampler(logits.clone(), banned).token_ids == [2, 0]
    random_banned = batch(2, banned=[[0, 1], [0, 1]])
    assert sampler(logits.clone(), random_banned).token_ids == [2, 2]


def test_penalties_arithmetic() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    b = batch(1, temperatures=0.0, penalties=[(0.5, 0.25, 2.0)], output_tokens=[[0, 0, 3]], prompt_tokens=[[1]])
    out = Sampler._apply_penalties(logits.clone(), b)[0]
    # repetition over prompt+output (0, 1, 3), then frequency (counts 2, 0, 0, 1, 0) and presence
    expected = [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2, 0.5, 3.0 / 2 - 0.25 - 0.5, 1.0]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_seeded_rows_are_reproducible_and_independent_of_the_batch() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).repeat(6, 1)
    seeds = [7, 7, 8, None, 7, 7]
    positions = [0, 0, 0, 0, 1, 0]
    first = Sampler(0, torch.device("cpu"))(logits.clone(), batch(6, seeds=seeds, output_positions=positions))
    other = Sampler(99, torch.device("cpu"))(logits[:1].clone(), batch(1, seeds=[7], output_positions=[0]))
    assert first.token_ids[0] == first.token_ids[1] == first.token_ids[5] == other.token_ids[0]
    many = [Sampler(0, torch.device("cpu"))(logits[:1].clone(), batch(1, seeds=[s])).token_ids[0] for s in range(20)]
    assert len(set(many)) > 3  # different seeds give different draws


def test_logprobs_are_raw_log_softmax_with_top_k() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 5.0, 1.0]])
    result = Sampler(0, torch.device("cpu"))(logits.clone(), SamplingBatch(
        temperatures=[0.0, 0.0], top_ps=[1.0, 1.0], top_ks=[0, 0], min_ps=[0.0, 0.0], seeds=[None, None],
        output_positions=[0, 0], logprobs=[2, -1], penalties=[(0.0, 0.0, 5.0), (0.0, 0.0, 1.0)],
        output_tokens=[[1], []], prompt_tokens=[[], []]))
    raw = torch.log_softmax(logits[0], -1)
    assert result.token_ids == [3, 2]  # the repetition penalty moved row 0 off token 1
    lp, top = result.logprobs[0]
    assert lp == pytest.approx(raw[3].item()) and [t for t, _ in top] == [1, 3]
    assert top[0][1] == pytest.approx(raw[1].item()) and result.logprobs[1] is None


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("min_tokens", 99),
    ("stop_token_ids", [-1]), ("logprobs", 21), ("seed", "x"),
])
def test_validate_names_the_parameter(field: str, value: object) -> None:
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(**{field: value}).validate()
    assert info.value.param == field and isinstance(info.value, ValueError)


# ---------------------------------------------------------------- through the engine (tiny qwen3)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir("qwen3")), num_kv_blocks=256))
    yield eng
    eng.shutdown()


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Run requests together; returns per id (tokens, logprobs, finish_reason)."""
    out = {rid: [[], [], None] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.error is None
            out[o.request_id][0] += o.new_token_ids
            out[o.request_id][1] += o.new_logprobs or []
            if o.finished:
                out[o.request_id][2] = o.finish_reason
    return out


def test_same_seed_same_output_alone_or_batched(engine: LLMEngine) -> None:
    prompt, others = random_prompts(1, (20, 20), seed=40)[0], random_prompts(3, (5, 60), seed=41)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run(engine, {"a": (prompt, seeded)})["a"][0]
    mixed = {"b": (prompt, seeded), **{f"o{i}": (p, SamplingParams(max_tokens=30, temperature=0.8))
                                       for i, p in enumerate(others)}}
    together = run(engine, mixed)["b"][0]
    assert alone == together and len(alone) == 24
    other_seed = run(engine, {"c": (prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99,
                                                            ignore_eos=True))})["c"][0]
    assert other_seed != alone


def test_logprobs_match_transformers(engine: LLMEngine) -> None:
    path = str(tiny_model_dir("qwen3"))
    prompt = random_prompts(1, (15, 15), seed=42)[0]
    tokens, logprobs, _ = run(engine, {"lp": (prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3,
                                                                     ignore_eos=True))})["lp"]
    assert tokens == hf_greedy(path, prompt, 6) and len(logprobs) == 6
    ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt + tokens])).logits[0], -1)
    for k, lp in enumerate(logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp.token_id == tokens[k] and lp.logprob == pytest.approx(row[tokens[k]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert all(math.isclose(v, row[t].item(), abs_tol=1e-4) for t, v in lp.top)


def test_repetition_penalty_matches_transformers(engine: LLMEngine) -> None:
    path = str(tiny_model_dir("qwen3"))
    prompt = random_prompts(1, (12, 12), seed=43)[0]
    params = SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
    got = run(engine, {"rp": (prompt, params)})["rp"][0]
    config = GenerationConfig(do_sample=False, max_new_tokens=20, repetition_penalty=1.5, eos_token_id=None,
                              pad_token_id=0)
    ref = hf_model(path).generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    assert got == ref and got != hf_greedy(path, prompt, 20)


def test_stop_token_ids_and_min_tokens(engine: LLMEngine) -> None:
    path = str(tiny_model_dir("qwen3"))
    prompt = random_prompts(1, (10, 10), seed=44)[0]
    greedy = hf_greedy(path, prompt, 20)
    stop = greedy[2]
    tokens, _, reason = run(engine, {"s": (prompt, SamplingParams(max_tokens=20, temperature=0.0,
                                                                   stop_token_ids=[stop], ignore_eos=True))})["s"]
    assert reason == "stop" and tokens == greedy[:greedy.index(stop) + 1]
    held = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop], min_tokens=8, ignore_eos=True)
    tokens, _, _ = run(engine, {"m": (prompt, held)})["m"]
    assert stop not in tokens[:8]
    config = GenerationConfig(do_sample=False, max_new_tokens=20, min_new_tokens=8, eos_token_id=stop,
                              pad_token_id=0)
    ref = hf_model(path).generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
    assert tokens == ref[:len(tokens)] and (tokens[-1] == stop or len(tokens) == 20)
