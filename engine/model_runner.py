"""One rank (TP rank of one pipeline stage): loads its shard of the model, owns its slice of the paged KV pool
(its stage's layers, for the same block ids on every stage), runs steps.

A step arrives as a `StepInput` (plain lists, cheap to pickle to worker processes): the new tokens of every
scheduled sequence, flattened, with their context lengths and block tables. The runner orders decodes first
(sorted by context length, for the grouped decode attention), builds the attention metadata, runs one forward
for the whole batch, computes logits only for the sequences that sample, and samples on rank 0 of the last stage.
Under pipeline parallelism a stage after the first takes its input activations from the previous stage and a
stage before the last hands its output to the next one (see pipeline.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pypto_serving.engine import attention_backends, data_parallel, expert_parallel
from pypto_serving.engine import device as devices
from pypto_serving.engine.attention_backends import StepAttention
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.attention import AttentionMetadata
from pypto_serving.engine.layers.linear import set_tp_group
from pypto_serving.engine.layers.sampler import Sampler, SampleResult, SamplingBatch
from pypto_serving.engine.loader import checkpoint_dtype, load_hf_config, load_weights
from pypto_serving.engine.models import model_class
from pypto_serving.engine.pipeline import Stage, StageLink, partition_layers, stage_of_rank


@dataclass
class StepInput:
    """One batch: sequences in scheduler order; ``input_ids`` holds each one's new tokens back to back."""

    step_id: int
    input_ids: list[int]
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the KV cache after this step (cached + new)
    block_tables: list[list[int]]
    sample_rows: list[int]  # sequences (batch indices) that sample a token this step
    sampling: SamplingBatch | None
    slot: int = 0  # micro-batch slot: the tag of its stage-to-stage messages
    more: bool = False  # DP+EP: this DP rank still has unfinished requests (the group's wave goes on)


@dataclass
class ModelInfo:
    """What the engine needs to know about the loaded model and KV pool (rank 0 reports it)."""

    num_kv_blocks: int
    vocab_size: int
    dtype: str
    device: str


class ModelRunner:
    """Model, KV pool and sampler of one rank; ``execute`` runs one step (rank 0 returns the sampled tokens)."""

    def __init__(self, config: EngineConfig, device_type: str, max_model_len: int, rank: int = 0,
                 world_size: int = 1, dist_init_method: str | None = None) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        tp = config.tensor_parallel_size
        self.tp_rank = rank % tp
        self.block_size = config.block_size
        self.device = devices.init_device(device_type, rank - config.first_rank)  # this node's device index
        self.dp_size, self.dp_rank = config.data_parallel_size, config.data_parallel_rank
        timeout = timedelta(seconds=max(1800.0, 4 * config.step_timeout_s))
        if self.dp_size > 1:  # DP+EP: the world is every DP rank's TP ranks; TP groups per DP rank
            data_parallel.init_world(config, devices.dist_backend(device_type), rank, timeout)
            groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(self.dp_size)]
            set_tp_group(groups[self.dp_rank])
        elif world_size > 1:
            dist.init_process_group(devices.dist_backend(device_type), init_method=dist_init_method,
                                    world_size=world_size, rank=rank, timeout=timeout)
            if config.pipeline_parallel_size > 1:  # every rank creates every stage's group, in the same order
                groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(world_size // tp)]
                set_tp_group(groups[rank // tp])
        hf_config = load_hf_config(config.model)
        bounds = partition_layers(hf_config.num_hidden_layers, config.pipeline_parallel_size,
                                  config.pp_layer_partition)
        index = stage_of_rank(rank, tp, config.pipeline_parallel_size, config.leader_last)
        self.stage = Stage(index, config.pipeline_parallel_size, *bounds[index])
        self.vocab_size = hf_config.vocab_size
        self.dtype = devices.resolve_dtype(config.dtype, checkpoint_dtype(hf_config), device_type)
        expert_parallel.configure(expert_parallel.ExpertParallelConfig(
            config.enable_expert_parallel, config.expert_placement_strategy, config.all2all_backend, self.dp_size,
            self.dp_rank))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf_config)(hf_config, self.dtype, self.stage)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.enable_expert_parallel and not getattr(self.model, "moe_layers", list)():
            raise ValueError(f"enable_expert_parallel: {hf_config.architectures} has no MoE layers to shard")
        load_weights(self.model, config.model)
        self.model.eval()
        self.link = StageLink(self.stage, rank, tp, hf_config.hidden_size, self.dtype, self.device, config.leader_last)
        self.num_kv_blocks = self._allocate_kv_cache(max_model_len)
        self.packed_linears = devices.prepare_model(self.model, self.device, config.cpu_prepack)
        self.attn_backend = attention_backends.create(  # the pool it reads includes the DP+EP scratch block
            devices.attention_backend(device_type, config.attention_backend), self.device, self.dtype,
            self.block_size, self.kv_cache.shape[2], self.block_bytes_per_layer)
        self.sampler = Sampler(config.seed, self.device)
        self.busy_s = 0.0  # time spent computing steps (not waiting for the previous stage)
        self.dp_sync_s = 0.0  # DP+EP: time spent in the per-step metadata all-reduce

    def info(self) -> ModelInfo:
        """The loaded model's vocabulary, dtype and KV pool size."""
        return ModelInfo(self.num_kv_blocks, self.vocab_size, str(self.dtype).removeprefix("torch."), str(self.device))

    def _allocate_kv_cache(self, max_model_len: int) -> int:
        layers = self.model.attention_layers()
        kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.block_bytes_per_layer = 2 * self.block_size * kv_heads * head_dim * elem
        num_blocks = self.config.num_kv_blocks
        if num_blocks is None:
            budget = devices.kv_cache_budget(self.device, self.config.kv_cache_memory)
            useful = self.config.max_num_seqs * math.ceil(max_model_len / self.block_size) + 1
            num_blocks = min(budget // (self.block_bytes_per_layer * len(layers)), useful)
        if dist.is_initialized():  # every rank must hold the same number of blocks
            num_blocks = int(devices.all_reduce(torch.tensor([num_blocks], device=self.device), op="min").item())
        if num_blocks < 2:
            raise ValueError("kv_cache_memory: too small for two KV blocks; raise it or set num_kv_blocks")
        # DP+EP: one scratch block past the pool takes the K/V of the one-token dummy batches (data_parallel.py)
        scratch = 1 if self.dp_size > 1 else 0
        shape = (2, len(layers), num_blocks + scratch, self.block_size, kv_heads, head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids and positions (decodes first), attention metadata, and each sample row's token index."""
        bs, qlens, ctxs, tables = self.block_size, step.query_lens, step.context_lens, step.block_tables
        starts = [0] * len(qlens)
        for i in range(1, len(qlens)):
            starts[i] = starts[i - 1] + qlens[i - 1]
        decodes = sorted((i for i, n in enumerate(qlens) if n == 1), key=ctxs.__getitem__)
        order = decodes + [i for i, n in enumerate(qlens) if n > 1]
        ids: list[int] = [step.input_ids[starts[i]] for i in decodes]
        positions: list[int] = [ctxs[i] - 1 for i in decodes]
        slots: list[int] = [tables[i][p // bs] * bs + p % bs for i, p in zip(decodes, positions, strict=True)]
        new_start = {i: k for k, i in enumerate(decodes)}
        pos_parts, slot_parts = [torch.tensor(positions, dtype=torch.long)], [torch.tensor(slots, dtype=torch.long)]
        offset = len(decodes)
        for i in order[len(decodes):]:
            n, ctx = qlens[i], ctxs[i]
            ids.extend(step.input_ids[starts[i]:starts[i] + n])
            pos = torch.arange(ctx - n, ctx)
            table = torch.tensor(tables[i][: -(-ctx // bs)], dtype=torch.long)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            new_start[i] = offset
            offset += n
        meta = self.attn_backend.prepare(StepAttention(
            torch.cat(slot_parts).to(self.device), [qlens[i] for i in order], [ctxs[i] for i in order],
            [tables[i] for i in order]))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        sample_index = [new_start[i] + qlens[i] - 1 for i in step.sample_rows]
        return input_ids, torch.cat(pos_parts).to(self.device), meta, sample_index

    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampleResult | None:
        """Run this stage's part of one step; rank 0 of the last stage returns the sampled tokens (others None).

        A stage that fails still takes its input from the previous stage and sends (zeros) to the next one, so no
        stage waits forever; the engine discards the step on the error this rank reports.
        """
        started, error, hidden = time.perf_counter(), None, None
        group_step = None
        if self.dp_size > 1:  # first, whatever happens next: every rank of the group takes part in every step
            group_step = data_parallel.exchange_step_meta(len(step.input_ids), step.more, self.dp_rank, self.dp_size,
                                                          self.device)
            expert_parallel.set_dp_tokens(group_step.tokens)
            self.dp_sync_s += time.perf_counter() - started
        try:
            input_ids, positions, meta, sample_index = self.prepare(step)
        except Exception as exc:
            error = exc
        intermediate = None
        if not self.stage.first:
            self.busy_s += time.perf_counter() - started
            intermediate = self.link.recv(step.slot, len(step.input_ids))
            started = time.perf_counter()
        if error is None:
            try:
                hidden = self.model(input_ids, positions, meta, intermediate)
            except Exception as exc:
                error = exc
        if not self.stage.last:
            if error is None:
                self.link.send(step.slot, *hidden)
            else:
                self.link.send_zeros(step.slot, len(step.input_ids))
        try:
            if error is not None:
                raise error
            result = self._sample(step, hidden, sample_index) if self.stage.last else None
            if result is not None and group_step is not None:
                result.dp_busy, result.dp_sync_s = group_step.busy, self.dp_sync_s
            return result
        finally:
            self.busy_s += time.perf_counter() - started

    def _sample(self, step: StepInput, hidden: torch.Tensor, sample_index: list[int]) -> SampleResult | None:
        if not step.sample_rows:
            result = SampleResult([], None) if self.tp_rank == 0 else None
        else:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_index, device=self.device)])
            result = self.sampler(logits[:, : self.vocab_size], step.sampling) if self.tp_rank == 0 else None
        if result is not None and hasattr(self.model, "moe_layers"):  # one copy to the host for all layers
            layers = self.model.moe_layers()  # under pipeline parallelism: the last stage's MoE layers
            counts = torch.stack([moe.take_expert_tokens() for _, moe in layers]).tolist() if layers else []
            result.expert_tokens = {i: c for (i, _), c in zip(layers, counts, strict=True)}
        return result

    def shutdown(self) -> None:
        """Leave the process group (when there is one)."""
        if dist.is_initialized():
            dist.destroy_process_group()
