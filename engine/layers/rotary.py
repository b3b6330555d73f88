"""Rotary position embedding (the non-interleaved "rotate half" form) with transformers' rope scaling types."""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the config's rope type (default, llama3, yarn, linear, ...)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
            raise ValueError(f"rope type {rope_type!r} is not supported")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0


class RotaryEmbedding(nn.Module):
    """A cos/sin table for every position (shared by all layers); `apply_rotary` rotates q and k with it."""

    def __init__(self, hf_config, head_dim: int, max_position: int, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim)
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        # cos/sin computed in float32 and cast to the compute dtype, as transformers does
        cos_sin = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).to(dtype)
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D / 2] at ``positions`` [T] (looked up once per step)."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by the step's cos/sin."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
