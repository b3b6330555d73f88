"""The model code against `transformers`: logits of prefill, chunked prefill and paged decode, per architecture."""

from __future__ import annotations

import pytest
import torch

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.model_runner import ModelRunner, StepInput
from tests.support.models import hf_model, tiny_model_dir

ARCHS = ["qwen3", "qwen2", "llama", "qwen3-moe", "qwen2-moe"]
PROMPT = [(7 * i + 3) % 1000 + 5 for i in range(45)]


def _logits(runner: ModelRunner, step: StepInput) -> torch.Tensor:
    """Logits of every new token, or only of ``step.sample_rows`` (in that order) when set."""
    with torch.inference_mode():
        ids, pos, meta, sample_index = runner.prepare(step)
        hidden = runner.model(ids, pos, meta)
        if step.sample_rows:
            hidden = hidden[sample_index]
        return runner.model.compute_logits(hidden)


def _step(ids: list[int], qlens: list[int], ctxs: list[int], tables: list[list[int]],
          sample_rows: list[int] | None = None) -> StepInput:
    return StepInput(0, ids, qlens, ctxs, tables, sample_rows or [], None)


@pytest.fixture(scope="module", params=ARCHS)
def arch_runner(request: pytest.FixtureRequest) -> tuple[str, ModelRunner]:
    path = str(tiny_model_dir(request.param))
    return path, ModelRunner(EngineConfig(model=path, num_kv_blocks=64, block_size=4), "cpu", 4096)


def test_prefill_logits_match_transformers(arch_runner: tuple[str, ModelRunner]) -> None:
    path, runner = arch_runner
    ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    got = _logits(runner, _step(PROMPT, [45], [45], [list(range(12))]))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_and_batched_decode_match_transformers(arch_runner: tuple[str, ModelRunner]) -> None:
    """Two sequences with scattered block tables: chunked prefill, then a mixed step, then batched decodes."""
    path, runner = arch_runner
    hf = hf_model(path)
    a, b = PROMPT[:30], PROMPT[10:21]
    ta, tb = [40, 3, 17, 8, 22, 9, 30, 1, 2, 11], [5, 60, 33, 12]  # blocks of 4 tokens, out of order
    runner.kv_cache.zero_()
    _logits(runner, _step(a[:13], [13], [13], [ta]))  # first chunk of a
    # second chunk of a (attends to cached context) together with the whole prompt of b
    got = _logits(runner, _step(a[13:] + b, [17, 11], [30, 11], [ta, tb]))
    ref_a = hf(torch.tensor([a])).logits[0, 13:]
    ref_b = hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(got[:17], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[17:], ref_b, rtol=1e-4, atol=1e-4)
    # three decode steps for both (one token each, different context lengths; decodes run sorted by length)
    seq_a, seq_b = list(a), list(b)
    for t in range(3):
        na, nb = 100 + t, 200 + t
        seq_a.append(na)
        seq_b.append(nb)
        got = _logits(runner, _step([na, nb], [1, 1], [len(seq_a), len(seq_b)], [ta, tb], sample_rows=[0, 1]))
        torch.testing.assert_close(got[0], hf(torch.tensor([seq_a])).logits[0, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], hf(torch.tensor([seq_b])).logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(dtype: str) -> None:
    path = str(tiny_model_dir("qwen3"))
    runner = ModelRunner(EngineConfig(model=path, num_kv_blocks=32, block_size=16, dtype=dtype), "cpu", 4096)
    assert runner.dtype == getattr(torch, dtype) and runner.kv_cache.dtype == runner.dtype
    got = _logits(runner, _step(PROMPT, [45], [45], [[0, 1, 2]])).float()
    ref = hf_model(path)(torch.tensor([PROMPT])).logits[0]
    assert torch.isfinite(got).all()
    # same argmax for most positions, logits within half-precision noise
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (got - ref).abs().mean() < 0.1 * ref.abs().mean()
    # the decode path (CPU half precision: matmul attention) agrees with the prefill of the same tokens
    runner.kv_cache.zero_()
    _logits(runner, _step(PROMPT[:-1], [44], [44], [[0, 1, 2]]))
    last = _logits(runner, _step(PROMPT[-1:], [1], [45], [[0, 1, 2]], sample_rows=[0]))[0].float()
    assert last.argmax() == got[-1].argmax()
    assert (last - got[-1]).abs().mean() < 0.05 * got[-1].abs().mean()


def test_auto_dtype_follows_checkpoint() -> None:
    path = str(tiny_model_dir("llama", dtype="bfloat16"))
    runner = ModelRunner(EngineConfig(model=path, num_kv_blocks=8), "cpu", 4096)
    assert runner.dtype == torch.bfloat16
    assert runner.model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch_ref", "cpu"])
def test_decodes_of_many_lengths_match_transformers(arch_runner: tuple[str, ModelRunner], backend: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Many decodes of different lengths in one step match transformers: cut into several padded groups (the
    reference backend), or read in place by the CPU kernel."""
    from pypto_serving.engine.attention_backends import create, torch_ref

    path, runner = arch_runner
    block_bytes = runner.block_bytes_per_layer
    monkeypatch.setattr(torch_ref, "GROUP_PAD_BYTES", 2 * block_bytes)
    monkeypatch.setattr(torch_ref, "GROUP_MAX_BYTES", 12 * block_bytes)
    monkeypatch.setattr(runner, "attn_backend", create(backend, runner.device, runner.dtype, runner.block_size,
                                                       runner.num_kv_blocks, block_bytes))
    assert runner.attn_backend.name == backend  # the kernel builds on this machine: no silent fallback
    hf = hf_model(path)
    lengths = [3, 30, 7, 18, 5, 26, 11, 4]  # context after the new token
    seqs = [[(13 * i + 7 * j) % 900 + 5 for j in range(n)] for i, n in enumerate(lengths)]
    tables, next_block = [], 0
    for n in lengths:
        tables.append(list(range(next_block, next_block + -(-n // 4))))
        next_block += len(tables[-1])
    runner.kv_cache.zero_()
    prompts = [s[:-1] for s in seqs]
    _logits(runner, _step([t for p in prompts for t in p], [len(p) for p in prompts], [len(p) for p in prompts],
                          tables))
    step = _step([s[-1] for s in seqs], [1] * len(seqs), lengths, tables, sample_rows=list(range(len(seqs))))
    _, _, meta, _ = runner.prepare(step)
    if backend == "torch_ref":
        assert len(meta.decodes) >= 3 and all((g.end - g.start) * g.blocks_per_seq <= 12 for g in meta.decodes)
    else:
        assert meta.num_decodes == len(seqs) and not meta.decodes
    got = _logits(runner, step)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(got[i], hf(torch.tensor([s])).logits[0, -1], rtol=1e-4, atol=1e-4)
