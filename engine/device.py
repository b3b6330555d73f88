"""Everything device-specific in one place: cpu (gloo), cuda (NCCL) and Ascend npu (torch_npu, HCCL).

The rest of the engine only sees a `torch.device` and calls the helpers below. The npu and cuda branches are
thin on purpose; only the cpu path runs in this repository's CI (see docs/architecture.md, "Engine core").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one Ascend device."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def select_device(requested: str, *, npu: bool, cuda: bool) -> str:
    """Pure selection rule: ``auto`` prefers npu, then cuda, then cpu; an explicit choice must be available."""
    if requested == "auto":
        return "npu" if npu else "cuda" if cuda else "cpu"
    if requested == "npu" and not npu:
        raise ValueError("device: npu requested but torch_npu is not installed or sees no Ascend device")
    if requested == "cuda" and not cuda:
        raise ValueError("device: cuda requested but torch sees no CUDA device")
    if requested not in DIST_BACKENDS:
        raise ValueError(f"device: must be auto, cpu, cuda or npu, got {requested!r}")
    return requested


def resolve_device(requested: str) -> str:
    """Return the device type (cpu|cuda|npu) to run on, probing only what ``requested`` needs."""
    if requested == "cpu":
        return "cpu"
    npu = requested in ("auto", "npu") and npu_available()
    cuda = requested in ("auto", "cuda") and not npu and torch.cuda.is_available()
    return select_device(requested, npu=npu, cuda=cuda)


def dist_backend(device_type: str) -> str:
    """torch.distributed backend for the device type: gloo, nccl or hccl."""
    return DIST_BACKENDS[device_type]


def device_count(device_type: str) -> int:
    """Number of devices of the type visible to this process (cpu: unbounded, reported as 1 << 16)."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    if device_type == "npu":
        return torch.npu.device_count()  # type: ignore[attr-defined]
    return 1 << 16


def init_device(device_type: str, local_rank: int) -> torch.device:
    """Bind this process to its device of the group and return it (cpu ranks share the host)."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "npu":
        import torch_npu  # noqa: F401

        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    else:
        torch.cuda.set_device(local_rank)
    return torch.device(device_type, local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def available_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on the device (cpu: MemAvailable of the host or cgroup)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "npu":
        return torch.npu.mem_get_info(device)[0]  # type: ignore[attr-defined]
    return _host_available_memory()


def _host_available_memory() -> int:
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # a container's memory limit (cgroup v2) bounds what it may use
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def kv_cache_budget(device: torch.device, setting: float | None) -> int:
    """Bytes for the KV pool from ``kv_cache_memory``: a fraction (<= 1) of free memory, or bytes (> 1)."""
    free = available_memory(device)
    if setting is None:
        return int(free * 0.9) if device.type != "cpu" else min(int(free * 0.25), 2 << 30)
    return int(setting) if setting > 1 else int(free * setting)


def resolve_dtype(requested: str, checkpoint_dtype: torch.dtype | None, device_type: str) -> torch.dtype:
    """The compute dtype: ``auto`` follows the checkpoint, except float16 on cpu which runs as float32."""
    if requested != "auto":
        return DTYPES[requested]
    dtype = checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.float32
    if device_type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


def attention_backend(device_type: str, requested: str = "auto") -> str:
    """The attention backend (engine/attention_backends/) for the device: ``auto`` is the in-place kernel on cpu
    and the plain-torch reference elsewhere (cuda, and npu until its torch_npu backend is filled in)."""
    if requested != "auto":
        return requested
    return "cpu" if device_type == "cpu" else "torch_ref"


def prepare_model(model: torch.nn.Module, device: torch.device, cpu_prepack: bool = True) -> int:
    """Device-specific rewrites of a loaded model: on cpu, prepacked oneDNN matmuls (engine/cpu_matmul.py).
    Returns the number of layers rewritten."""
    if device.type == "cpu" and cpu_prepack:
        from pypto_serving.engine import cpu_matmul

        return cpu_matmul.prepack(model)
    return 0


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") as cores, None when unlimited."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period if period > 0 else None


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` as cores, None when unlimited (quota -1)."""
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(proc_cgroup: str, root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The tightest CPU quota, in cores, on the cgroups named by `proc_cgroup` (the text of /proc/self/cgroup) and
    their ancestors under `root`, cgroup v2 or v1; None when nothing limits it. Every level that exists is read, so a
    container that sees only its own cgroup at `root` (a cgroup namespace, v1 bind mounts) is covered too."""
    root = Path(root)
    limits: list[float] = []
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            bases = [root / "unified", root]  # v2 (a hybrid host mounts it under unified/)
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu"]  # v1: "cpu,cpuacct" (often also linked as "cpu")
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for base in dict.fromkeys(bases):
            for depth in range(len(parts), -1, -1):
                limit = _cgroup_dir_limit(base.joinpath(*parts[:depth]))
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _cgroup_dir_limit(directory: Path) -> float | None:
    try:
        return parse_cpu_max((directory / "cpu.max").read_text())
    except (OSError, ValueError):
        pass
    try:
        return parse_cfs_quota((directory / "cpu.cfs_quota_us").read_text(),
                               (directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (a pod's cpu limit), >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        limit = cgroup_cpu_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        limit = None
    if limit is not None:
        cores = min(cores, int(limit))  # more threads than the quota only get throttled
    return max(1, cores)


def cpu_threads_per_rank(world_size: int, requested: int | None = None) -> int:
    """Torch intra-op threads for one cpu rank: ``requested``, else the usable cores split across ranks."""
    if requested:
        return requested
    return max(1, usable_cpus() // world_size)


# ------------------------------------------------------------------ collectives of the expert-parallel layers
# The MoE layers (layers/moe.py, expert_parallel.py) exchange tokens only through these, on the tensor-parallel
# group of the rank's pipeline stage or the expert-parallel world of a DP+EP group (``group``; None: the default
# group of all the world's ranks), and the DP+EP step metadata (data_parallel.py) is one all_reduce: gloo on cpu,
# NCCL on cuda, HCCL on npu. All three implement the ops used here (gloo's all_to_all_single with uneven
# splits and all_gather_into_tensor are exercised by tests/engine/test_moe_ep.py on the pinned torch); a backend
# without one raises torch's own error at the first MoE step: nothing falls back.


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None = None, op: str = "sum") -> torch.Tensor:
    """Reduce ``x`` (``op``: sum|max|min) over the ranks of ``group``, in place; returns it."""
    dist.all_reduce(x, op=REDUCE_OPS[op], group=group)
    return x


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere) stacked along dim 0, in rank order."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    # torch 2.13 calls this deprecated in favour of all_gather_single, which older torch / torch_npu lack
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rows of ``x`` cut into ``send_counts`` consecutive parts, part r to rank r of ``group``; returns the rows
    received."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out
