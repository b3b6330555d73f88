"""The Llama family in one decoder: Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

The forward pass takes the step's tokens flattened across sequences ([T]), their positions and the paged
attention metadata; projections are tensor-parallel (q/k/v and gate/up merged into one matmul each). Under
pipeline parallelism the model holds one `Stage`'s layers (the others are empty placeholders that keep the
checkpoint's layer numbering): the first stage embeds, the last one normalises and holds the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pypto_serving.engine.layers.attention import Attention, AttentionMetadata
from pypto_serving.engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from pypto_serving.engine.layers.layernorm import RMSNorm
from pypto_serving.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pypto_serving.engine.layers.rotary import RotaryEmbedding, apply_rotary
from pypto_serving.engine.pipeline import Stage

Activations = tuple[torch.Tensor, torch.Tensor]  # hidden states and residual passed between pipeline stages


class DecoderAttention(nn.Module):
    """Self-attention: merged qkv projection, optional q/k norm, rope, paged attention, output projection."""

    def __init__(self, cfg) -> None:
        super().__init__()
        arch = cfg.model_type
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bias = getattr(cfg, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=bias or arch == "qwen2")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size,
                                        bias=bias and arch != "qwen2")
        self.qk_norm = arch == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rope)
        return self.o_proj(self.attn(q, k, v, meta))


class DecoderMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, cfg) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the next norm."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        self.mlp = DecoderMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, the decoder layers and the final norm (of one pipeline stage: ``stage``)."""

    def __init__(self, cfg, dtype: torch.dtype, stage: Stage, tied: bool) -> None:
        super().__init__()
        self.stage = stage
        # a tied LM head on the last stage reuses the embedding weights, so that stage loads them too
        embed = stage.first or (tied and stage.last)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if embed else None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = RotaryEmbedding(cfg, head_dim, cfg.max_position_embeddings, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg) if stage.owns_layer(i) else nn.Identity()
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: Activations | None = None) -> torch.Tensor | Activations:
        """Final hidden states on the last stage, else the activations for the next stage (``intermediate``:
        those of the previous stage; None on the first)."""
        if intermediate is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate
        rope = self.rotary(positions)
        for layer in self.layers[self.stage.start:self.stage.end]:
            x, residual = layer(rope, x, residual, meta)
        if self.norm is None:
            return x, residual
        return self.norm(x, residual)[0]


class LlamaFamilyForCausalLM(nn.Module):
    """Llama / Qwen2 / Qwen3 causal LM with checkpoint names mapped onto the merged projections."""

    # checkpoint module -> (module here, shard id of the merged parameter)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg, dtype: torch.dtype, stage: Stage | None = None) -> None:
        super().__init__()
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        self.stage = stage or Stage(0, 1, 0, cfg.num_hidden_layers)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.model = DecoderModel(cfg, dtype, self.stage, self.tie_word_embeddings)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size) if self.stage.last else None
        if self.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: Activations | None = None) -> torch.Tensor | Activations:
        """Final hidden states [T, hidden] of the step's tokens (on the last stage; see `DecoderModel`)."""
        return self.model(input_ids, positions, meta, intermediate)

    def stage_owns(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this pipeline stage (the loader skips the others')."""
        if name.startswith("model.layers."):
            return self.stage.owns_layer(int(name.split(".")[2]))
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.stage.last
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] (on every rank; only rank 0 samples)."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        """The paged-attention modules, in layer order (the runner hands each its KV pool slice)."""
        return [layer.self_attn.attn for layer in self.model.layers[self.stage.start:self.stage.end]]
