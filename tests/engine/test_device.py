"""Device selection, dist backends, dtypes and memory budgets (the npu/cuda branches by their pure logic)."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.mark.parametrize(("text", "cores"), [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("50000 100000", 0.5),
    ("400000\n", 4.0), ("", None),
])
def test_parse_cgroup_v2_cpu_max(text: str, cores: float | None) -> None:
    assert devices.parse_cpu_max(text) == cores


@pytest.mark.parametrize(("quota", "period", "cores"), [
    ("-1\n", "100000\n", None), ("300000\n", "100000\n", 3.0), ("25000", "50000", 0.5), ("0", "100000", None),
])
def test_parse_cgroup_v1_cfs_quota(quota: str, period: str, cores: float | None) -> None:
    assert devices.parse_cfs_quota(quota, period) == cores


def test_cgroup_cpu_limit_v2_in_a_cgroup_namespace(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a pod with limits.cpu: 2500m sees its own cgroup at root
    assert devices.cgroup_cpu_limit("0::/\n", tmp_path) == 2.5


def test_cgroup_cpu_limit_v2_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    pod, container = tmp_path / "kubepods" / "pod1", tmp_path / "kubepods" / "pod1" / "ctr"
    container.mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("150000 100000\n")
    (container / "cpu.max").write_text("400000 100000\n")
    assert devices.cgroup_cpu_limit("0::/kubepods/pod1/ctr\n", tmp_path) == 1.5


def test_cgroup_cpu_limit_v1_with_the_container_cgroup_mounted_at_root(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert devices.cgroup_cpu_limit(proc, tmp_path) == 3.0


def test_cgroup_cpu_limit_unlimited_or_unreadable(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert devices.cgroup_cpu_limit("3:cpu:/\n0::/\n", tmp_path) is None
    assert devices.cgroup_cpu_limit("0::/x\n", tmp_path / "missing") is None
    assert devices.cgroup_cpu_limit("", tmp_path) is None


def test_usable_cpus_is_within_the_affinity() -> None:
    assert 1 <= devices.usable_cpus() <= len(os.sched_getaffinity(0))
    assert devices.cpu_threads_per_rank(1) == devices.usable_cpus()
