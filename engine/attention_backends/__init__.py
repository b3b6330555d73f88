"""Attention backends behind one seam (base.py); `create` builds the one `engine/device.py` selects."""

from __future__ import annotations

import torch

from pypto_serving.engine.attention_backends.base import AttentionBackend, AttentionMetadata, StepAttention

BACKENDS = ("cpu", "torch_ref", "npu")

__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "StepAttention", "create"]


def create(name: str, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
           block_bytes_per_layer: int) -> AttentionBackend:
    """The backend called ``name`` (one of BACKENDS) for this rank's KV pool."""
    if name == "cpu":
        from pypto_serving.engine.attention_backends.cpu import CpuBackend as cls
    elif name == "torch_ref":
        from pypto_serving.engine.attention_backends.torch_ref import TorchRefBackend as cls
    elif name == "npu":
        from pypto_serving.engine.attention_backends.npu import NpuBackend as cls
    else:
        raise ValueError(f"attention_backend: must be one of {', '.join(BACKENDS)}, got {name!r}")
    return cls(device, dtype, block_size, num_blocks, block_bytes_per_layer)
