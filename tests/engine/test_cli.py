"""`pypto-serving engine` options: CONTRACT.md flag names, serving.json (flat and sectioned), precedence, errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pypto_serving.engine.cli import parse_options
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.serving_config import ConfigError, split
from tests.support.common import REPO_ROOT

CONTRACT_FLAGS = ["--model", "m", "--served-model-name", "svc", "--host", "10.0.0.7", "--port", "8001",
                  "--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2",
                  "--pipeline-parallel-size", "2", "--max-model-len", "512", "--max-num-seqs", "8",
                  "--max-num-batched-tokens", "256", "--long-prefill-token-threshold", "64",
                  "--block-size", "8", "--num-kv-blocks", "100", "--no-enable-prefix-caching"]


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "serving.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_contract_flags_map_to_engine_and_server_options():
    engine, server = split(parse_options(CONTRACT_FLAGS))
    assert engine == {"model": "m", "served_model_name": "svc", "device": "cpu", "dtype": "float32",
                      "tensor_parallel_size": 2, "pipeline_parallel_size": 2, "pp_layer_partition": None,
                      "max_num_micro_batches": None, "pp_blocking": False, "max_model_len": 512, "max_num_seqs": 8,
                      "max_num_batched_tokens": 256, "long_prefill_token_threshold": 64, "block_size": 8,
                      "num_kv_blocks": 100, "enable_prefix_caching": False, "kv_cache_memory": None, "seed": 0,
                      "step_timeout_s": 120.0, "cpu_threads": None, "attention_backend": "auto", "cpu_prepack": True,
                      "enable_expert_parallel": False,
                      "expert_placement_strategy": "linear", "all2all_backend": "allgather_reducescatter",
                      "nnodes": 1, "node_rank": 0, "master_addr": None, "master_port": 29500, "headless": False,
                      "data_parallel_size": 1, "data_parallel_rank": 0, "data_parallel_address": "127.0.0.1",
                      "data_parallel_rpc_port": 29550}
    assert server["host"] == "10.0.0.7" and server["port"] == 8001


def test_multi_node_flags_make_a_headless_node():
    engine, _ = split(parse_options(["--model", "m", "--tensor-parallel-size", "4", "--nnodes", "2", "--node-rank",
                                     "1", "--master-addr", "10.0.0.7", "--master-port", "29501", "--headless"]))
    config = EngineConfig(**engine)
    assert (config.nnodes, config.node_rank, config.headless, config.first_rank) == (2, 1, True, 2)
    assert config.dist_init_method() == "tcp://10.0.0.7:29501"


def test_defaults_bind_loopback():
    options = parse_options(["--model", "m"])
    assert options["host"] == "127.0.0.1" and options["port"] == 8000
    assert options["enable_prefix_caching"] is True


def test_seeds_shape_and_flag_override(tmp_path):
    path = write(tmp_path, {
        "model": {"path": "/models/q", "name": "qwen"},
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "data_parallel_size": 4},
        "scheduler": {"max_num_seqs": 32, "max_num_batched_tokens": 4096},
        "cache": {"block_size": 32, "enable_prefix_caching": False},
    })
    options = parse_options(["--config", path, "--max-num-seqs", "7", "--enable-prefix-caching"])
    assert options["model"] == "/models/q" and options["served_model_name"] == "qwen"
    assert options["tensor_parallel_size"] == 2 and options["data_parallel_size"] == 4
    assert options["max_num_seqs"] == 7  # the flag wins over the file
    assert options["max_num_batched_tokens"] == 4096 and options["block_size"] == 32
    assert options["enable_prefix_caching"] is True


def test_flat_names_in_any_spelling(tmp_path):
    path = write(tmp_path, {"model": "/m", "max-num-seqs": 3, "maxNumBatchedTokens": 64, "drain_timeout": 5,
                            "parallel": {"tensorParallelSize": 2, "expertParallel": {"enabled": False,
                                                                                     "all2allBackend": "default"}}})
    options = parse_options(["--config", path])
    assert (options["max_num_seqs"], options["max_num_batched_tokens"], options["tensor_parallel_size"]) == (3, 64, 2)
    assert options["drain_timeout"] == 5.0
    assert options["enable_expert_parallel"] is False and options["all2all_backend"] == "allgather_reducescatter"


def test_expert_parallel_section_and_flags(tmp_path):
    """The operator's {enabled, placement, all2allBackend} shape maps onto vLLM's three flags; flags win."""
    path = write(tmp_path, {"model": "/m", "parallel": {"expertParallel": {
        "enabled": True, "placement": "round-robin", "all2allBackend": "alltoall"}}})
    options = parse_options(["--config", path])
    assert options["enable_expert_parallel"] is True
    assert (options["expert_placement_strategy"], options["all2all_backend"]) == ("round_robin", "alltoall")
    options = parse_options(["--config", path, "--no-enable-expert-parallel", "--all2all-backend",
                             "allgather_reducescatter", "--expert-placement-strategy", "linear"])
    assert options["enable_expert_parallel"] is False and options["expert_placement_strategy"] == "linear"
    assert options["all2all_backend"] == "allgather_reducescatter"
    from pypto_serving.engine.config import EngineConfig

    for field, bad in (("expert_placement_strategy", "random"), ("all2all_backend", "deepep")):
        with pytest.raises(ValueError, match=f"{field}: must be one of"):
            EngineConfig(model="/m", **{field: bad})


@pytest.mark.parametrize(("data", "message"), [
    ({"model": "/m", "max_num_seq": 3}, "max_num_seq"),
    ({"model": "/m", "scheduler": {"max_num_seqs": 3, "bogus": 1}}, "scheduler.bogus"),
    ({"model": "/m", "parallel": {"pipeline_parallel_size": "2"}}, "parallel.pipeline_parallel_size: expected int"),
    ({"model": "/m", "parallel": {"expert_parallel": {"enabled": 1}}}, "expert_parallel.enabled: expected bool"),
    ({"model": "/m", "parallel": {"expert_parallel": {"mode": "x"}}}, "expected {enabled, placement, all2allBackend}"),
    ({"model": "/m", "max_num_seqs": "8"}, "max_num_seqs: expected int"),
    ({"model": "/m", "cache": {"enable_prefix_caching": 1}}, "cache.enable_prefix_caching: expected bool"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_config_names_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(["--config", write(tmp_path, data)])


def test_model_is_required():
    with pytest.raises(ConfigError, match="model"):
        parse_options([])


def test_pipeline_parallel_flags_reach_the_engine_config(tmp_path):
    options = parse_options(["--model", "m", "--pipeline-parallel-size", "3", "--pp-layer-partition", "2,1,1",
                             "--max-num-micro-batches", "2", "--tensor-parallel-size", "2"])
    config = EngineConfig(**split(options)[0])
    assert (config.pipeline_parallel_size, config.pp_layer_partition, config.micro_batches, config.world_size) == (
        3, "2,1,1", 2, 6)
    blocking = EngineConfig(**split(parse_options(["--model", "m", "--pipeline-parallel-size", "2",
                                                   "--pp-blocking"]))[0])
    assert blocking.micro_batches == 1
    path = write(tmp_path, {"model": "/m", "parallel": {"pipelineParallelSize": 2, "ppLayerPartition": "1,1"}})
    assert EngineConfig(**split(parse_options(["--config", path]))[0]).micro_batches == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pipeline_parallel_size": 0}, "pipeline_parallel_size: must be a positive integer"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "2"}, "has 1 stages, pipeline_parallel_size is 2"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "2,x"}, "expected positive layer counts"),
    ({"pipeline_parallel_size": 2, "pp_layer_partition": "2,0"}, "expected positive layer counts"),
    ({"max_num_micro_batches": 0}, "max_num_micro_batches: must be a positive integer"),
    ({"pp_blocking": True, "max_num_micro_batches": 2}, "pp_blocking runs one micro-batch"),
])
def test_bad_pipeline_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **kwargs)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO_ROOT / ".venv/bin/pypto-serving"), "engine", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)


def test_cli_rejects_bad_options_with_the_reason(tmp_path):
    bad = run_cli("--config", write(tmp_path, {"model": "/m", "scheduler": {"nope": 1}}))
    assert bad.returncode == 2
    assert "scheduler.nope" in bad.stderr
    invalid = run_cli("--model", "/m", "--block-size", "0")
    assert invalid.returncode == 2
    assert "block_size" in invalid.stderr


def test_openmp_workers_sleep_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from pypto_serving.engine.cli import idle_openmp_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    idle_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    idle_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
