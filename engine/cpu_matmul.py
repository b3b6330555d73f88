"""oneDNN matmuls with prepacked weights for the cpu linears (q/k/v, o, gate/up, down and the LM head).

`prepack` reorders each weight once, after loading, into oneDNN's blocked layout for this CPU
(``mkldnn._reorder_linear_weight``) and installs ``mkldnn._linear_pointwise`` as the layer's kernel, the path
inductor's CPU freezing takes too. Per step this saves F.linear's per-call repacking: measured 1.1x at batch 1 and
1.3-1.9x at batches 16-64 in float32 and 2x at batch 1 in bfloat16 on this repository's machine
(docs/benchmarks.md). The plain weight is freed unless another module shares it (a tied embedding), so the
weights are not held twice. float32 always; bfloat16 only where oneDNN supports it on this CPU.

oneDNN builds one kernel per input shape, i.e. per weight and number of rows M, which varies with every step's token
count, and keeps it in two caches (its primitive cache and ideep's), 1024 kernels each by default, at about 0.57 MB
per kernel whatever the weight's size: up to ~580 MB that an engine only reaches after many steps of distinct M.
`bound_kernel_caches` caps both at ``KERNEL_CACHE_CAPACITY`` kernels (~36 MB; a miss costs one kernel build,
~0.4 ms, once per step and weight shape, not per layer).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from pypto_serving.engine.layers.embed_head import ParallelLMHead
from pypto_serving.engine.layers.linear import ColumnParallelLinear, RowParallelLinear

LINEARS = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)
KERNEL_CACHE_CAPACITY = 64
CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's and ideep's


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's kernel caches unless the environment already sets them. Both read their capacity once, when
    the process builds its first oneDNN kernel, so this must run before that (it does, in `prepack`)."""
    for name in CACHE_ENV:
        os.environ.setdefault(name, str(capacity))


def supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs linears of this dtype on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packed_linear(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack(model: nn.Module) -> int:
    """Install prepacked kernels on every linear of ``model``; returns how many (0: dtype not supported)."""
    layers = [m for m in model.modules() if isinstance(m, LINEARS)]
    if not layers or not supported(layers[0].weight.dtype):
        return 0
    bound_kernel_caches()
    owners: dict[int, int] = {}
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    for m in layers:
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
        m.kernel = functools.partial(_packed_linear, packed)
        if owners[id(m.weight)] == 1:  # free the plain copy; dtype stays visible
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)
    return len(layers)
