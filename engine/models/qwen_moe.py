"""Qwen3-MoE (top-k routed experts, no shared expert) and Qwen2-MoE (plus a shared expert with a sigmoid gate).

Attention, norms, embeddings and the LM head are the Llama family's (models/llama.py); only the MLP of each
sparse layer differs. ``mlp_only_layers`` and ``decoder_sparse_step`` keep some layers dense, as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pypto_serving.engine.layers.linear import _param
from pypto_serving.engine.layers.moe import FusedMoE
from pypto_serving.engine.models.llama import DecoderMLP, LlamaFamilyForCausalLM


class SharedExpertMoE(FusedMoE):
    """Qwen2-MoE's block: routed experts + sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.shared_expert = DecoderMLP(cfg, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Module()
        self.shared_expert_gate.weight = _param(1, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return super().forward(x) + shared


class QwenMoeForCausalLM(LlamaFamilyForCausalLM):
    """Qwen2MoeForCausalLM / Qwen3MoeForCausalLM; checkpoint expert tensors load through the loader's expert map."""

    @staticmethod
    def make_mlp(cfg, layer_index: int) -> nn.Module:
        sparse = (layer_index not in (getattr(cfg, "mlp_only_layers", None) or []) and cfg.num_experts > 0
                  and (layer_index + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0)
        if not sparse:
            return DecoderMLP(cfg)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            return SharedExpertMoE(cfg)
        return FusedMoE(cfg)

    def moe_layers(self) -> list[tuple[int, FusedMoE]]:
        """(layer index, MoE block) of every sparse layer."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers)
                if isinstance(getattr(layer, "mlp", None), FusedMoE)]  # a pipeline stage holds only its layers
