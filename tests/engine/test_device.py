"""Device selection, dist backends, dtypes and memory budgets (the npu/cuda branches by their pure logic)."""

from __future__ import annotations

import pytest
import torch

from pypto_serving.engine import device as devices


@pytest.mark.parametrize(("requested", "npu", "cuda", "expected"), [
    ("auto", True, True, "npu"),
    ("auto", False, True, "cuda"),
    ("auto", False, False, "cpu"),
    ("cpu", True, True, "cpu"),
    ("cuda", True, True, "cuda"),
    ("npu", True, False, "npu"),
])
def test_select_device(requested: str, npu: bool, cuda: bool, expected: str) -> None:
    assert devices.select_device(requested, npu=npu, cuda=cuda) == expected


@pytest.mark.parametrize(("requested", "message"), [("npu", "torch_npu"), ("cuda", "CUDA"), ("tpu", "auto, cpu")])
def test_unavailable_devices_are_rejected_by_name(requested: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        devices.select_device(requested, npu=False, cuda=False)
    assert str(info.value).startswith("device:")


def test_this_machine_resolves_to_cpu() -> None:
    # no Ascend or CUDA device here: auto falls back to cpu, an explicit npu/cuda request fails clearly
    assert not devices.npu_available() and not torch.cuda.is_available()
    assert devices.resolve_device("auto") == devices.resolve_device("cpu") == "cpu"
    for name in ("npu", "cuda"):
        with pytest.raises(ValueError, match=f"device: {name}"):
            devices.resolve_device(name)
    assert devices.init_device("cpu", 3) == torch.device("cpu")


def test_dist_backends() -> None:
    assert [devices.dist_backend(d) for d in ("cpu", "cuda", "npu")] == ["gloo", "nccl", "hccl"]


@pytest.mark.parametrize(("requested", "checkpoint", "device_type", "expected"), [
    ("auto", torch.bfloat16, "cpu", torch.bfloat16),
    ("auto", torch.float16, "cpu", torch.float32),
    ("auto", torch.float16, "npu", torch.float16),
    ("auto", None, "cuda", torch.float32),
    ("float16", torch.float32, "cpu", torch.float16),
    ("bfloat16", torch.float32, "npu", torch.bfloat16),
])
def test_resolve_dtype(requested: str, checkpoint: torch.dtype | None, device_type: str,
                       expected: torch.dtype) -> None:
    assert devices.resolve_dtype(requested, checkpoint, device_type) == expected


def test_kv_budget_fraction_bytes_and_cpu_default() -> None:
    cpu = torch.device("cpu")
    free = devices.available_memory(cpu)
    assert free > 0
    assert devices.kv_cache_budget(cpu, 123456789.0) == 123456789
    assert abs(devices.kv_cache_budget(cpu, 0.5) - free * 0.5) < 0.01 * free
    assert 0 < devices.kv_cache_budget(cpu, None) <= 2 << 30


def test_cpu_threads_split_across_ranks() -> None:
    cores = devices.cpu_threads_per_rank(1)
    assert cores >= 1
    assert devices.cpu_threads_per_rank(2) == max(1, cores // 2)
    assert devices.cpu_threads_per_rank(64) == 1
    assert devices.cpu_threads_per_rank(2, requested=3) == 3
