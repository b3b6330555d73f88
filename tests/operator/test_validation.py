"""Pure validation: every corpus resource is rejected with its field-named message; valid ones pass."""

from __future__ import annotations

import pytest

from pypto_serving.operator import validation
from tests.operator.corpus import InvalidCase, load_corpus, minimal

CORPUS = load_corpus()


def test_corpus_is_large_and_covers_both_stages() -> None:
    assert len(CORPUS) >= 20
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    assert {case.stage for case in CORPUS} == {"schema", "webhook"}
    assert sum(case.stage == "webhook" for case in CORPUS) >= 10


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_case_rejected_with_field_named_message(case: InvalidCase) -> None:
    spec, problems = validation.validate(case.body)
    assert spec is None
    messages = [str(p) for p in problems]
    assert any(case.expect in m for m in messages), f"{case.name}: {messages}"
    assert any(p.field == case.field or p.field.startswith(case.field) or case.field in p.field for p in problems)
    assert case.expect in validation.summary(problems)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_case_is_otherwise_valid(case: InvalidCase) -> None:
    """Each corpus entry has exactly one thing wrong, so it tests that one check."""
    _, problems = validation.validate(case.body)
    assert len(problems) == 1, [str(p) for p in problems]


def test_minimal_resource_is_valid_and_defaulted() -> None:
    spec, problems = validation.validate(minimal())
    assert problems == [] and spec is not None
    assert spec.replicas == 1 and spec.parallel.pipeline_parallel_size == 1
    assert spec.devices.resource_name == "huawei.com/Ascend910"
    assert spec.gateway.routing == "least-pending-tokens" and spec.gateway.enabled
    assert spec.rollout.max_unavailable == 1 and spec.rollout.max_surge == 0
    assert spec.drain.timeout_seconds == 600 and spec.devices_per_replica == 1


def test_full_resource_is_valid() -> None:
    body = minimal(
        replicas=4,
        model={"name": "qwen3-moe", "path": "/models/Qwen3", "volume": {"hostPath": {"path": "/data/models"}},
               "mountPath": "/models", "moe": True},
        parallel={"tensorParallelSize": 8, "pipelineParallelSize": 1,
                  "expertParallel": {"enabled": True, "placement": "round_robin", "all2allBackend": "alltoall"}},
        devices={"resourceName": "huawei.com/ascend-1980", "perNode": 8, "hccnConfPath": "/etc/hccn.conf"},
        engine={"dtype": "bfloat16", "maxModelLen": 8192, "maxNumSeqs": 64, "maxNumBatchedTokens": 8192,
                "blockSize": 128, "enablePrefixCaching": False, "extraArgs": ["--enforce-eager"],
                "env": [{"name": "HCCL_CONNECT_TIMEOUT", "value": "1200"}],
                "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}},
                "nodeSelector": {"accelerator": "ascend-910b"},
                "tolerations": [{"key": "huawei.com/Ascend910", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "high-priority", "shmSize": "16Gi"},
        gateway={"replicas": 2, "routing": "prefix-aware", "serviceType": "NodePort",
                 "apiKeySecret": {"name": "api-keys", "key": "token"}},
        rollout={"maxUnavailable": 0, "maxSurge": 1}, drain={"timeoutSeconds": 0})
    spec, problems = validation.validate(body)
    assert [str(p) for p in problems] == []
    assert spec is not None and spec.devices_per_replica == 8


def test_pipeline_parallel_is_accepted_while_tp_x_pp_fits_a_node() -> None:
    spec, problems = validation.validate(minimal(parallel={"tensorParallelSize": 2, "pipelineParallelSize": 4},
                                                 devices={"perNode": 8}))
    assert problems == [] and spec is not None and spec.devices_per_replica == 8
    _, problems = validation.validate(minimal(parallel={"tensorParallelSize": 1, "pipelineParallelSize": 2}))
    assert problems == []  # no perNode: no fit check
    spec, problems = validation.validate(minimal(parallel={"tensorParallelSize": 2, "pipelineParallelSize": 8},
                                                 devices={"perNode": 8}))
    assert problems == [] and spec is not None  # a serving group of 2 pods; the leader holds the last stage


def test_problems_accumulate_and_summary_joins_them() -> None:
    body = minimal(parallel={"tensorParallelSize": 3, "pipelineParallelSize": 3},
                   devices={"perNode": 8, "resourceName": "bad"})
    _, problems = validation.validate(body)
    fields = [p.field for p in problems]
    assert fields == ["spec.parallel.tensorParallelSize", "spec.devices.resourceName"]
    assert validation.summary(problems).count("; ") == 1


def test_non_object_spec_and_unknown_fields() -> None:
    _, problems = validation.validate({"metadata": {"name": "x"}, "spec": None})
    assert [str(p) for p in problems] == ["spec: is required and must be an object"]
    _, problems = validation.validate(minimal(replica=3))
    assert [str(p) for p in problems] == ["spec.replica: unknown field"]
    _, problems = validation.validate(minimal(replicas="two"))
    assert [str(p) for p in problems] == ["spec.replicas: must be an integer (got 'two')"]


@pytest.mark.parametrize(("name", "ok"), [("a", True), ("demo-1", True), ("1demo", False), ("Demo", False),
                                          ("x" * 55, True), ("x" * 56, False), ("", False)])
def test_name_rules(name: str, ok: bool) -> None:
    assert (validation.check_name(name) == []) is ok
