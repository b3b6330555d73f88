"""The engine's options: one table that makes both the CLI flags and the `--config serving.json` keys.

serving.json may use the flat option names (``max_num_seqs``, ``max-num-seqs`` or ``maxNumSeqs``) and/or the
seeds' sectioned shape::

    {"model": {"path": "/models/Qwen3-14B", "name": "qwen3-14b"},
     "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "data_parallel_size": 1},
     "scheduler": {"max_num_seqs": 64, "max_num_batched_tokens": 4096},
     "cache": {"block_size": 16, "enable_prefix_caching": true}}

Unknown keys and values of the wrong type are errors naming the key. Flags given on the command line override
the file. ``parallel.expert_parallel`` takes ``{enabled, placement, all2all_backend}`` (the operator's shape) for
the three expert-parallel flags.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# option -> (type, default, help, where it goes: "engine" = EngineConfig, "server" = the HTTP server)
OPTIONS: dict[str, tuple[type, Any, str, str]] = {
    "model": (str, None, "HF-format model directory", "engine"),
    "served_model_name": (str, None, "the OpenAI model name (default: the directory's name)", "engine"),
    "host": (str, "127.0.0.1", "address to bind (the operator passes the pod IP)", "server"),
    "port": (int, 8000, "port to listen on", "server"),
    "device": (str, "auto", "auto|cpu|cuda|npu", "engine"),
    "dtype": (str, "auto", "auto|bfloat16|float16|float32", "engine"),
    "tensor_parallel_size": (int, 1, "tensor-parallel ranks (devices) of this replica", "engine"),
    "pipeline_parallel_size": (int, 1, "pipeline-parallel stages; the replica uses tensor_parallel_size x "
                                       "pipeline_parallel_size devices", "engine"),
    "pp_layer_partition": (str, None, "decoder layers per pipeline stage, e.g. '2,1' (default: an even split)",
                           "engine"),
    "max_num_micro_batches": (int, None, "micro-batches in flight at once (default: pipeline_parallel_size)",
                              "engine"),
    "pp_blocking": (bool, False, "run one micro-batch at a time (the blocking pipeline loop, for comparison)",
                    "engine"),
    "nnodes": (int, 1, "pods (nodes) this replica spans; its ranks are split evenly over them", "engine"),
    "node_rank": (int, 0, "this node's index (0: the leader, which serves)", "engine"),
    "master_addr": (str, None, "the leader's address (its torch.distributed store), when nnodes > 1", "engine"),
    "master_port": (int, 29500, "the leader's torch.distributed store port", "engine"),
    "headless": (bool, False, "run this node's model ranks only (node_rank > 0): no scheduler, no OpenAI server",
                 "engine"),
    "data_parallel_size": (int, 1, "DP+EP: engines (DP ranks) that share the experts of a MoE model and step in "
                                   "lockstep; needs --enable-expert-parallel", "engine"),
    "data_parallel_rank": (int, 0, "DP+EP: this engine's DP rank (0 hosts the group's store)", "engine"),
    "data_parallel_address": (str, "127.0.0.1", "DP+EP: DP rank 0's address", "engine"),
    "data_parallel_rpc_port": (int, 29550, "DP+EP: the port of DP rank 0's group store (rendezvous, waves, "
                                           "heartbeats)", "engine"),
    "enable_expert_parallel": (bool, False, "shard the experts of MoE layers over the EP ranks (EP = TP x DP)",
                               "engine"),
    "expert_placement_strategy": (str, "linear", "linear|round_robin: which EP rank owns which expert", "engine"),
    "all2all_backend": (str, "allgather_reducescatter", "allgather_reducescatter|alltoall: how tokens reach "
                        "their experts under EP", "engine"),
    "max_model_len": (int, None, "maximum prompt + output tokens (default: the model's)", "engine"),
    "max_num_seqs": (int, 256, "maximum requests in the running batch", "engine"),
    "max_num_batched_tokens": (int, 2048, "token budget of one step (PP: shared by the micro-batches in flight)",
                               "engine"),
    "long_prefill_token_threshold": (int, 0, "cap on one request's prefill chunk per step (0: none)", "engine"),
    "block_size": (int, 16, "tokens per KV-cache block", "engine"),
    "num_kv_blocks": (int, None, "KV-cache blocks (default: sized from --kv-cache-memory)", "engine"),
    "kv_cache_memory": (float, None, "KV pool budget: a fraction (<= 1) of free device memory, or bytes", "engine"),
    "enable_prefix_caching": (bool, True, "reuse KV blocks of shared prompt prefixes", "engine"),
    "seed": (int, 0, "engine seed for requests without their own", "engine"),
    "step_timeout_s": (float, 120.0, "a worker step slower than this fails its batch", "engine"),
    "cpu_threads": (int, None, "torch threads per rank on cpu (default: the CPU affinity capped by the cgroup "
                                "CPU quota, split across TP ranks)", "engine"),
    "attention_backend": (str, "auto", "auto|cpu|torch_ref: how attention reads the paged KV pool (auto: the "
                          "device's own; cpu: an in-place C kernel, torch_ref: gather + SDPA)", "engine"),
    "cpu_prepack": (bool, True, "cpu: oneDNN matmuls with the weights prepacked once at load (1.1-1.6x faster "
                                "steps; ~36 MB of kernel caches, see docs/architecture.md)", "engine"),
    "drain_timeout": (float, 120.0, "seconds SIGTERM waits for in-flight requests before exiting", "server"),
    "max_body_bytes": (int, 8 * 1024 * 1024, "largest request body accepted (else 413)", "server"),
    "control_token_file": (str, None, "file holding the bearer token POST/DELETE /drain require (the operator "
                           "mounts its Secret there); without it they answer 403", "server"),
    "log_level": (str, "info", "debug|info|warning|error", "server"),
    "access_log": (bool, False, "log every HTTP request", "server"),
}

# serving.json sections -> the options they may hold (section-local name -> option)
SECTIONS: dict[str, dict[str, str]] = {
    "model": {"path": "model", "name": "served_model_name"},
    "parallel": {"tensor_parallel_size": "tensor_parallel_size", "pipeline_parallel_size": "pipeline_parallel_size",
                 "data_parallel_size": "data_parallel_size", "data_parallel_rank": "data_parallel_rank",
                 "data_parallel_address": "data_parallel_address",
                 "data_parallel_rpc_port": "data_parallel_rpc_port", "expert_parallel": "expert_parallel",
                 "pp_layer_partition": "pp_layer_partition", "max_num_micro_batches": "max_num_micro_batches",
                 "pp_blocking": "pp_blocking"},
    "scheduler": {k: k for k in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold",
                                 "max_model_len")},
    "cache": {k: k for k in ("block_size", "enable_prefix_caching", "num_kv_blocks", "kv_cache_memory")},
    "engine": {k: k for k, v in OPTIONS.items() if v[3] == "engine"},
    "server": {k: k for k, v in OPTIONS.items() if v[3] == "server"},
}
EXPERT_PARALLEL_KEYS = {"enabled": "enable_expert_parallel", "placement": "expert_placement_strategy",
                        "all2all_backend": "all2all_backend"}


class ConfigError(ValueError):
    """A bad serving.json or option value; the message names the key."""


def normalize(key: str) -> str:
    """``maxNumSeqs`` / ``max-num-seqs`` -> ``max_num_seqs``."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).replace("-", "_").lower()


def check_value(name: str, value: Any) -> Any:
    """Type-check one option value (None allowed only where the default is None)."""
    kind, default, _, _ = OPTIONS[name]
    if value is None and default is None:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def load_serving_config(path: str | Path) -> dict[str, Any]:
    """Read serving.json into flat option names (only the keys the file sets)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object")
    flat: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = normalize(raw_key)
        if key in SECTIONS and isinstance(value, dict):
            for raw_sub, sub_value in value.items():
                sub = normalize(raw_sub)
                if sub not in SECTIONS[key]:
                    raise ConfigError(f"unknown key {raw_key}.{raw_sub!s} in {path}")
                _set(flat, SECTIONS[key][sub], sub_value, f"{raw_key}.{raw_sub}")
        elif key in OPTIONS:
            _set(flat, key, value, raw_key)
        else:
            raise ConfigError(f"unknown key {raw_key!r} in {path}")
    return flat


def _set(flat: dict[str, Any], name: str, value: Any, where: str) -> None:
    if name == "expert_parallel":
        if not isinstance(value, dict) or any(normalize(k) not in EXPERT_PARALLEL_KEYS for k in value):
            raise ConfigError(f"{where}: expected {{enabled, placement, all2allBackend}}, got {value!r}")
        for key, sub_value in value.items():
            # the operator's spellings: all2allBackend "default" is the engine's default, "round-robin" vLLM's
            sub_value = {"default": OPTIONS["all2all_backend"][1], "round-robin": "round_robin"}.get(sub_value,
                                                                                                   sub_value)
            _set(flat, EXPERT_PARALLEL_KEYS[normalize(key)], sub_value, f"{where}.{key}")
        return
    try:
        flat[name] = check_value(name, value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).split(': ', 1)[1]}") from exc


def resolve(file_options: dict[str, Any], cli_options: dict[str, Any]) -> dict[str, Any]:
    """Defaults, overridden by the file, overridden by the command line; checks what the engine cannot do."""
    options = {name: spec[1] for name, spec in OPTIONS.items()}
    options.update(file_options)
    options.update(cli_options)
    if not options["model"]:
        raise ConfigError("model: --model (or \"model\" in --config) is required")
    return options


def split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(EngineConfig kwargs, server options)."""
    engine = {k: v for k, v in options.items() if OPTIONS[k][3] == "engine"}
    server = {k: v for k, v in options.items() if OPTIONS[k][3] == "server"}
    return engine, server
