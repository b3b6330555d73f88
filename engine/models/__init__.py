"""Model architectures by the name in config.json's ``architectures``."""

from __future__ import annotations

from pypto_serving.engine.models.llama import LlamaFamilyForCausalLM
from pypto_serving.engine.models.qwen_moe import QwenMoeForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaFamilyForCausalLM,
    "Qwen2ForCausalLM": LlamaFamilyForCausalLM,
    "Qwen3ForCausalLM": LlamaFamilyForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
}


def model_class(hf_config) -> type[LlamaFamilyForCausalLM]:
    """The implementation for the checkpoint's architecture (ValueError naming the supported ones)."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"model: unsupported architecture {getattr(hf_config, 'architectures', None)}; "
                     f"supported: {', '.join(MODELS)}")
