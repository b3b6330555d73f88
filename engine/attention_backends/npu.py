"""Where an Ascend NPU backend plugs in: torch_npu's paged and fused attention ops, as vllm-ascend uses them.

Not implemented yet (no NPU in CI): `NpuBackend` raises NotImplementedError, and npu runs the plain-torch
reference backend (torch_ref.py) until this is filled and tested on hardware. The KV pool layout is already the
one these ops take: per layer ``[num_blocks, block_size, kv_heads, head_dim]`` for K and for V.

The ops (torch_npu, as vllm-ascend's ``attention/attention_v1.py`` calls them):

- write KV: ``torch_npu._npu_reshape_and_cache(key=k, value=v, key_cache=k_cache, value_cache=v_cache,
  slot_indices=slot_mapping)`` (int32 slots) replaces the two ``index_copy_`` of `AttentionBackend.write_kv`;
- decode: ``torch_npu._npu_paged_attention(query=q, key_cache=k_cache, value_cache=v_cache,
  num_kv_heads=..., num_heads=..., scale_value=scale, block_table=tables, context_lens=lens, out=out)`` with
  int32 ``block_table [decodes, max blocks]`` and ``context_lens [decodes]`` (the same tables the CPU backend
  builds in `CpuBackend.prepare`);
- prefill without cached context: ``torch_npu._npu_flash_attention(query=q, key=k, value=v, mask=causal_mask,
  seq_len=query_lens, scale_value=scale, num_heads=..., num_kv_heads=..., out=out)`` over the step's own tokens;
- chunked prefill / prefix-cache hits (mixed batches): ``torch_npu.npu_fused_infer_attention_score(q, k_cache,
  v_cache, block_table=tables, actual_seq_lengths=query_lens (cumulative), actual_seq_lengths_kv=context_lens,
  num_heads=..., num_key_value_heads=..., input_layout="TND", scale=scale, sparse_mode=3, atten_mask=mask)``.

`prepare` builds those int32 tensors once per step on the device; `attend` picks the op per part of the batch.
"""

from __future__ import annotations

from pypto_serving.engine.attention_backends.base import AttentionBackend, AttentionMetadata, StepAttention

MESSAGE = ("attention backend 'npu' (torch_npu fused ops) is not implemented yet; npu runs the 'torch_ref' "
           "backend (see engine/attention_backends/npu.py)")


class NpuBackend(AttentionBackend):
    """Skeleton of the torch_npu backend (see the module docstring)."""

    name = "npu"

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(MESSAGE)

    def prepare(self, step: StepAttention) -> AttentionMetadata:
        raise NotImplementedError(MESSAGE)

    def attend(self, layer, q, k, v, meta):
        raise NotImplementedError(MESSAGE)
