"""The attention-backend seam: the CPU kernel against the reference gather + SDPA, input checks, selection."""

from __future__ import annotations

import pytest
import torch

from pypto_serving.engine import device as devices
from pypto_serving.engine.attention_backends import StepAttention, create, kernel
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.attention import Attention

BLOCK = 4


def _layer(dtype: torch.dtype, blocks: int = 40, heads: int = 8, kv_heads: int = 2, dim: int = 16) -> Attention:
    layer = Attention(heads, kv_heads, dim, dim**-0.5)
    gen = torch.Generator().manual_seed(0)
    layer.k_cache = torch.randn(blocks, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    layer.v_cache = torch.randn(blocks, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    return layer


def _run(name: str, dtype: torch.dtype, qlens: list[int], ctxs: list[int], tables: list[list[int]]) -> torch.Tensor:
    """One step through backend ``name`` on a fresh (seeded, so identical) pool; returns the attention output."""
    layer, total = _layer(dtype), sum(qlens)
    backend = create(name, torch.device("cpu"), dtype, BLOCK, layer.k_cache.shape[0], 1 << 10)
    assert backend.name == name
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for n, c, t in zip(qlens, ctxs, tables, strict=True)
             for p in range(c - n, c)]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(total, layer.num_heads, layer.head_dim, generator=gen).to(dtype)
    k = torch.randn(total, layer.num_kv_heads, layer.head_dim, generator=gen).to(dtype)
    v = torch.randn(total, layer.num_kv_heads, layer.head_dim, generator=gen).to(dtype)
    meta = backend.prepare(StepAttention(torch.tensor(slots), qlens, ctxs, tables))
    return layer(q, k, v, meta).float()


# decodes (sorted by context length, one ending exactly on a block boundary), then a prefill with cached context
# and a fresh prefill; tables are scattered over the pool
QLENS = [1, 1, 1, 1, 5, 6]
CTXS = [1, 8, 13, 30, 11, 6]
TABLES = [[7], [3, 12], [20, 1, 9, 33], [39, 2, 4, 6, 8, 10, 11, 13], [14, 15, 16], [17, 18]]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_kernel_equals_the_reference_backend(dtype: torch.dtype, tol: float) -> None:
    got = _run("cpu", dtype, QLENS, CTXS, TABLES)
    ref = _run("torch_ref", dtype, QLENS, CTXS, TABLES)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_cpu_kernel_uses_the_threads_torch_uses() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", torch.float32, QLENS, CTXS, TABLES)
        torch.set_num_threads(2)
        two = _run("cpu", torch.float32, QLENS, CTXS, TABLES)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # every (row, kv head) is computed the same way by whichever thread


def test_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPTO_CACHE_DIR", str(tmp_path))
    kernel.load.cache_clear()
    try:
        built = kernel.load()
        assert built is not None and built.path.parent == tmp_path / "kernels" and built.path.exists()
        assert built.supports(torch.float32) and built.supports(torch.bfloat16) and not built.supports(torch.float16)
    finally:
        kernel.load.cache_clear()


def test_without_a_compiler_cpu_falls_back_to_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "_compiler", lambda: None)
    kernel.load.cache_clear()
    try:
        backend = create("cpu", torch.device("cpu"), torch.float32, BLOCK, 40, 1 << 10)
        assert backend.name == "torch_ref" and backend.kernel is None
        layer = _layer(torch.float32)
        meta = backend.prepare(StepAttention(torch.tensor([0]), [1], [1], [[0]]))
        out = layer(torch.randn(1, 8, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 16), meta)
        assert out.shape == (1, 8 * 16)
    finally:
        kernel.load.cache_clear()


@pytest.mark.parametrize(("ctxs", "tables", "message"), [
    ([9], [[0, 1]], "needs more than 2 blocks"),  # 9 tokens do not fit in 2 blocks of 4
    ([4], [[40]], "outside the pool"),
    ([4], [[-1]], "outside the pool"),
])
def test_cpu_backend_rejects_tables_that_would_read_outside_the_pool(ctxs: list[int], tables: list[list[int]],
                                                                     message: str) -> None:
    backend = create("cpu", torch.device("cpu"), torch.float32, BLOCK, 40, 1 << 10)
    with pytest.raises(ValueError, match=message):
        backend.prepare(StepAttention(torch.tensor([0]), [1], ctxs, tables))


def test_npu_backend_is_a_documented_skeleton() -> None:
    with pytest.raises(NotImplementedError, match="torch_npu"):
        create("npu", torch.device("cpu"), torch.float32, BLOCK, 40, 1 << 10)
    with pytest.raises(ValueError, match="attention_backend"):
        create("flash", torch.device("cpu"), torch.float32, BLOCK, 40, 1 << 10)


def test_selection() -> None:
    assert devices.attention_backend("cpu") == "cpu"
    assert devices.attention_backend("cuda") == "torch_ref"
    assert devices.attention_backend("npu") == "torch_ref"
    assert devices.attention_backend("cpu", "torch_ref") == "torch_ref"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model="/m", attention_backend="flash")
