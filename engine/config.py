"""Engine configuration: what the CLI flags and serving.json set, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda", "npu")
DTYPES = ("auto", "bfloat16", "float16", "float32")
PLACEMENTS = ("linear", "round_robin")  # expert_parallel.py, without importing torch here
ALL2ALL_BACKENDS = ("allgather_reducescatter", "alltoall")
ATTENTION_BACKENDS = ("auto", "cpu", "torch_ref", "npu")  # engine/attention_backends/, without importing torch


@dataclass
class EngineConfig:
    """Settings of one engine (one DP replica). Validated in ``__post_init__`` (ValueError naming the field)."""

    model: str  # HF directory on local disk
    served_model_name: str | None = None  # defaults to the directory's basename
    device: str = "auto"  # auto|cpu|cuda|npu (auto: npu, else cuda, else cpu)
    # auto: the checkpoint's torch_dtype, except float16 on cpu -> float32 (slow fp16 kernels on CPUs)
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1  # stages; the replica runs tensor_parallel_size x pipeline_parallel_size ranks
    pp_layer_partition: str | None = None  # decoder layers per stage, e.g. "2,1" (None: an even split)
    # micro-batches in flight at once (None: pipeline_parallel_size, one per stage); pp_blocking forces 1
    max_num_micro_batches: int | None = None
    pp_blocking: bool = False  # one micro-batch in flight: the blocking loop, kept for comparison
    # expert parallelism of MoE models (vLLM's flags; see expert_parallel.py): EP size = tensor_parallel_size x
    # data_parallel_size
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"  # linear|round_robin
    all2all_backend: str = "allgather_reducescatter"  # allgather_reducescatter|alltoall
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0  # 0 = no per-request chunk cap
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory
    # KV pool budget when num_kv_blocks is None: <= 1.0 is a fraction of the device memory free after loading the
    # weights, > 1 a number of bytes. None: 0.9 on accelerators, 0.25 of available RAM (at most 2 GiB) on cpu.
    # The pool never exceeds what max_num_seqs sequences of max_model_len tokens can use.
    kv_cache_memory: float | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    step_timeout_s: float = 120.0
    # torch threads per rank on cpu; None: the cores this process may use (CPU affinity, capped by the cgroup CPU
    # quota, i.e. a pod's cpu limit), split evenly across TP ranks
    cpu_threads: int | None = None
    # engine/attention_backends/: auto = the device's own (cpu: the in-place kernel; others: torch_ref)
    attention_backend: str = "auto"
    # cpu: oneDNN matmuls with weights prepacked once at load (engine/cpu_matmul.py; its kernel caches are capped)
    cpu_prepack: bool = True
    # A replica spanning several pods (nodes): vLLM's multi-node flags. Node 0 (the leader) runs the scheduler and
    # the OpenAI server; the others run their ranks only (headless). Ranks are split evenly, node by node.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # the leader's address (its torch.distributed store)
    master_port: int = 29500
    headless: bool = False  # run this node's ranks only, no scheduler or OpenAI server (node_rank > 0)
    # DP+EP (vLLM's flags; see data_parallel.py): this engine is DP rank ``data_parallel_rank`` of
    # ``data_parallel_size`` engines whose ranks form one expert-parallel world and step in lockstep. DP rank 0
    # hosts the group's store (rendezvous, waves, heartbeats) at data_parallel_address:data_parallel_rpc_port.
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 29550

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: a local model directory is required")
        if self.served_model_name is None:
            self.served_model_name = os.path.basename(os.path.normpath(self.model))
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        positive = {"tensor_parallel_size": self.tensor_parallel_size,
                    "pipeline_parallel_size": self.pipeline_parallel_size, "max_num_seqs": self.max_num_seqs,
                    "max_num_batched_tokens": self.max_num_batched_tokens, "block_size": self.block_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_num_micro_batches is not None:
            if not isinstance(self.max_num_micro_batches, int) or self.max_num_micro_batches < 1:
                raise ValueError(f"max_num_micro_batches: must be a positive integer, got "
                                 f"{self.max_num_micro_batches!r}")
            if self.pp_blocking and self.max_num_micro_batches != 1:
                raise ValueError(f"max_num_micro_batches: pp_blocking runs one micro-batch at a time, got "
                                 f"{self.max_num_micro_batches}")
        if self.pp_layer_partition is not None:
            parts = self.pp_layer_partition.split(",")
            if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"pp_layer_partition: expected positive layer counts like '2,1', got "
                                 f"{self.pp_layer_partition!r}")
            if len(parts) != self.pipeline_parallel_size:
                raise ValueError(f"pp_layer_partition: {self.pp_layer_partition!r} has {len(parts)} stages, "
                                 f"pipeline_parallel_size is {self.pipeline_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len: must be a positive integer, got {self.max_model_len!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold: must be >= 0 (0 disables the cap)")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks: must be at least 2, got {self.num_kv_blocks!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory: must be > 0 (a fraction <= 1 or bytes), got {self.kv_cache_memory!r}")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s: must be > 0, got {self.step_timeout_s!r}")
        if self.expert_placement_strategy not in PLACEMENTS:
            raise ValueError(f"expert_placement_strategy: must be one of {', '.join(PLACEMENTS)}, got "
                             f"{self.expert_placement_strategy!r}")
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(f"all2all_backend: must be one of {', '.join(ALL2ALL_BACKENDS)}, got "
                             f"{self.all2all_backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                             f"{self.attention_backend!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be >= 1, got {self.cpu_threads!r}")
        self._check_nodes()
        self._check_data_parallel()

    def _check_nodes(self) -> None:
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"nnodes: must be a positive integer, got {self.nnodes!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank: must be in [0, {self.nnodes}), got {self.node_rank!r}")
        if self.headless != (self.node_rank > 0):
            raise ValueError("headless: node 0 serves (not headless) and every other node is headless, got "
                             f"node_rank {self.node_rank} with headless={self.headless}")
        if self.nnodes == 1:
            return
        if self.world_size % self.nnodes:
            raise ValueError(f"nnodes: {self.world_size} ranks (tensor x pipeline parallel) do not split evenly "
                             f"over {self.nnodes} nodes")
        if not self.master_addr:
            raise ValueError("master_addr: the leader's address is required when nnodes > 1")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port: must be a TCP port, got {self.master_port!r}")

    def _check_data_parallel(self) -> None:
        dp = self.data_parallel_size
        if not isinstance(dp, int) or dp < 1:
            raise ValueError(f"data_parallel_size: must be a positive integer, got {dp!r}")
        if not isinstance(self.data_parallel_rank, int) or not 0 <= self.data_parallel_rank < dp:
            raise ValueError(f"data_parallel_rank: must be in [0, {dp}), got {self.data_parallel_rank!r}")
        if dp == 1:
            return
        if not self.enable_expert_parallel:
            raise ValueError("data_parallel_size: DP ranks of one engine group step in lockstep to share the experts "
                             "of a MoE model, so data_parallel_size > 1 needs enable_expert_parallel; for a dense "
                             "model run independent replicas instead (spec.replicas)")
        if self.pipeline_parallel_size > 1:
            raise ValueError("data_parallel_size: DP+EP with pipeline_parallel_size > 1 is not supported yet")
        if self.micro_batches > 1:
            raise ValueError("max_num_micro_batches: a DP+EP group steps one batch at a time (lockstep)")
        if self.nnodes > 1:
            raise ValueError("data_parallel_size: a DP rank spanning several nodes (nnodes > 1) is not supported yet; "
                             "each DP rank runs on one node")
        if not self.data_parallel_address:
            raise ValueError("data_parallel_address: DP rank 0's address is required when data_parallel_size > 1")
        if not 0 < self.data_parallel_rpc_port < 65536:
            raise ValueError(f"data_parallel_rpc_port: must be a TCP port, got {self.data_parallel_rpc_port!r}")

    @property
    def dist_world_size(self) -> int:
        """Ranks of the torch.distributed world this engine's ranks join: TP x PP, times DP under DP+EP."""
        return self.world_size * self.data_parallel_size

    @property
    def dist_rank_offset(self) -> int:
        """Global rank of this engine's rank 0 in that world (DP rank x TP x PP)."""
        return self.data_parallel_rank * self.world_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches the engine keeps in flight."""
        if self.pp_blocking:
            return 1
        return self.max_num_micro_batches or self.pipeline_parallel_size

    @property
    def leader_last(self) -> bool:
        """Stages are numbered from the last (rank 0's): a replica spanning nodes keeps its sampling stage on the
        leader node (see pipeline.py)."""
        return self.nnodes > 1

    @property
    def ranks_per_node(self) -> int:
        """Ranks (devices) this node runs."""
        return self.world_size // self.nnodes

    @property
    def first_rank(self) -> int:
        """The global rank of this node's first rank."""
        return self.node_rank * self.ranks_per_node

    def dist_init_method(self) -> str | None:
        """The leader's store for a replica spanning nodes (None: a local one is chosen)."""
        return f"tcp://{self.master_addr}:{self.master_port}" if self.nnodes > 1 else None

    @property
    def world_size(self) -> int:
        """Ranks (devices) of the replica: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
