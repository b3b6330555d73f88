"""Prepacked oneDNN matmuls on cpu: installed on every linear, plain copies freed unless shared, same logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pypto_serving.engine import cpu_matmul
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.model_runner import ModelRunner, StepInput
from tests.support.models import tiny_model_dir

PROMPT = [(5 * i + 2) % 900 + 5 for i in range(20)]


def _logits(runner: ModelRunner) -> torch.Tensor:
    with torch.inference_mode():
        ids, pos, meta, _ = runner.prepare(StepInput(0, PROMPT, [20], [20], [[0, 1, 2, 3, 4]], [], None))
        return runner.model.compute_logits(runner.model(ids, pos, meta))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepacked_linears_give_the_plain_logits(dtype: str) -> None:
    path = str(tiny_model_dir("qwen2"))  # tied embeddings: the LM head shares the embedding's weight
    plain = ModelRunner(EngineConfig(model=path, num_kv_blocks=8, block_size=4, dtype=dtype, cpu_prepack=False),
                        "cpu", 512)
    packed = ModelRunner(EngineConfig(model=path, num_kv_blocks=8, block_size=4, dtype=dtype, cpu_prepack=True),
                         "cpu", 512)
    assert plain.packed_linears == 0
    if not cpu_matmul.supported(packed.dtype):  # bfloat16 needs oneDNN support on this CPU
        assert packed.packed_linears == 0
        return
    layers = packed.model.model.layers
    assert packed.packed_linears == 4 * len(layers) + 1  # qkv, o, gate_up, down per layer + the LM head
    attn = layers[0].self_attn
    assert attn.qkv_proj.kernel is not None and attn.qkv_proj.weight.numel() == 0  # freed, dtype kept
    assert attn.qkv_proj.weight.dtype == packed.dtype
    head = packed.model.lm_head
    assert head.kernel is not None and head.weight is packed.model.model.embed_tokens.weight and head.weight.numel()
    tol = 1e-5 if dtype == "float32" else 5e-2
    torch.testing.assert_close(_logits(packed).float(), _logits(plain).float(), rtol=tol, atol=tol)


# In a fresh process (both caches read their capacity once, at the process's first oneDNN kernel): every linear's
# kernel at 200 distinct row counts, RSS growth printed in MB.
_MANY_SHAPES = """
import os, sys, psutil, torch
from pypto_serving.engine import cpu_matmul
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.model_runner import ModelRunner
runner = ModelRunner(EngineConfig(model=sys.argv[1], num_kv_blocks=8, block_size=4, cpu_prepack=True), "cpu", 512)
assert {os.environ[name] for name in cpu_matmul.CACHE_ENV} == {str(cpu_matmul.KERNEL_CACHE_CAPACITY)}
linears = [m for m in runner.model.modules() if getattr(m, "kernel", None) is not None]
before = psutil.Process().memory_info().rss
for rows in range(1, 201):
    for m in linears:
        m.kernel(torch.randn(rows, m.kernel.args[0].shape[1]), None)
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def test_kernel_caches_stay_bounded_under_many_batch_shapes() -> None:
    """oneDNN keeps one kernel (~0.57 MB) per weight shape and row count: 200 row counts on the tiny model's 5 weight
    shapes would hold ~570 MB at oneDNN's default capacities (1024); capped at 64 kernels, ~36 MB."""
    env = {k: v for k, v in os.environ.items() if k not in cpu_matmul.CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", _MANY_SHAPES, str(tiny_model_dir("qwen3"))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 80, f"RSS grew {out.stdout.strip()} MB"
