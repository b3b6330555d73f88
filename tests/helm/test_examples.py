"""examples/: every manifest is valid (operator validation + the real apiserver), the local one matches the demo,
and the HPA example really scales a PyptoServing through its scale subresource."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack import demo
from pypto_serving.operator.defaults import BUILTIN
from pypto_serving.operator.validation import validate
from tests.support.common import REPO_ROOT, wait_for

EXAMPLES = REPO_ROOT / "examples"
SERVINGS = [EXAMPLES / "serving.yaml", EXAMPLES / "local" / "serving.yaml", EXAMPLES / "serving-moe.yaml"]


def load(path: Path) -> dict[str, Any]:
    """The one document of an example file."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, path
    return docs[0]


@pytest.mark.parametrize("path", SERVINGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_serving_examples_pass_the_operators_validation(path: Path) -> None:
    body = load(path)
    policy = BUILTIN  # the chart's defaults; the local example's values widen the host paths for its model
    if path.parent.name == "local":
        extra = yaml.safe_load((path.parent / "values.yaml").read_text())["security"]["extraAllowedHostPaths"]
        policy = dataclasses.replace(BUILTIN, allowed_host_paths=(*BUILTIN.allowed_host_paths, *extra))
        assert validate(body)[1], "the local example's model directory needs the local values' allow-list"
    spec, problems = validate(body, policy)
    assert not problems, problems
    assert spec is not None


def test_qwen3_example_is_what_the_docs_promise() -> None:
    spec = load(EXAMPLES / "serving.yaml")["spec"]
    assert spec["replicas"] == 2 and spec["parallel"]["tensorParallelSize"] == 4
    assert spec["devices"]["resourceName"] == "huawei.com/Ascend910"
    assert spec["model"]["path"].startswith(spec["model"]["mountPath"] + "/")
    assert "hostPath" in spec["model"]["volume"] and "persistentVolumeClaim" in (EXAMPLES / "serving.yaml").read_text()


def test_local_example_is_what_the_demo_runs() -> None:
    spec = load(EXAMPLES / "local" / "serving.yaml")["spec"]
    assert Path(spec["model"]["volume"]["hostPath"]["path"]) == demo.DEFAULT_MODEL_DIR
    assert load(EXAMPLES / "local" / "serving.yaml")["metadata"]["name"] == demo.NAMESPACE
    values = yaml.safe_load((EXAMPLES / "local" / "values.yaml").read_text())
    assert values["webhook"]["mode"] == "url"  # the local apiserver reaches pods by IP, not Services
    assert values["operator"]["watch"] == {"allNamespaces": False, "namespaces": [demo.NAMESPACE]}
    rendered = yaml.safe_load(demo.rendered_example(Path("/elsewhere/model")))
    assert rendered["spec"]["model"]["volume"]["hostPath"]["path"] == "/elsewhere/model"


def test_hpa_example_targets_the_serving_example() -> None:
    hpa = load(EXAMPLES / "hpa.yaml")
    serving = load(EXAMPLES / "serving.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": serving["apiVersion"], "kind": serving["kind"],
                                             "name": serving["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] <= serving["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_moe_example_runs_expert_parallel_inside_the_pod() -> None:
    from pypto_serving.operator.desired import engine_args

    spec, problems = validate(load(EXAMPLES / "serving-moe.yaml"))
    assert not problems and spec is not None and spec.model.moe
    args = engine_args(spec)
    assert args[args.index("--enable-expert-parallel"):][:5] == [
        "--enable-expert-parallel", "--expert-placement-strategy", "linear", "--all2all-backend", "alltoall"]


def for_kubernetes_1_20(hpa: dict[str, Any]) -> dict[str, Any]:
    """autoscaling/v2 -> v2beta2 (identical fields) for the 1.20 apiserver of the local cluster."""
    assert hpa["apiVersion"] == "autoscaling/v2"
    return {**hpa, "apiVersion": "autoscaling/v2beta2"}


@pytest.mark.cluster
def test_examples_pass_a_server_side_dry_run(cluster: Any, namespace: str, crd: str) -> None:
    docs = [load(p) for p in SERVINGS] + [for_kubernetes_1_20(load(EXAMPLES / "hpa.yaml"))]
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                             input=yaml.safe_dump_all(docs))
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout


@pytest.mark.cluster
def test_hpa_scales_a_pyptoserving_through_its_scale_subresource(cluster: Any, namespace: str, crd: str) -> None:
    """The HPA controller reads and writes the scale subresource: minReplicas above the current count makes it
    scale up before any metric exists (no operator needed: this checks the CRD's scale wiring)."""
    serving = load(EXAMPLES / "serving.yaml")
    serving["spec"]["replicas"] = 1
    hpa = for_kubernetes_1_20(load(EXAMPLES / "hpa.yaml"))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([serving, hpa]))
    assert cluster.kubectl("get", "pps", "qwen3-14b", "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout == "1"

    def scaled() -> bool:
        out = cluster.kubectl("get", "pps", "qwen3-14b", "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout
        return out == str(hpa["spec"]["minReplicas"])

    # the controller-manager's HPA sync period is 15 s
    wait_for(scaled, 90, "the HPA to scale the PyptoServing to minReplicas", interval=1)

    def status() -> dict[str, Any]:
        out = cluster.kubectl("get", "hpa.v2beta2.autoscaling", "qwen3-14b", "-n", namespace, "-o", "json").stdout
        return json.loads(out).get("status") or {}

    # the HPA itself records the rescale it made through the scale subresource
    wait_for(lambda: status().get("desiredReplicas") == hpa["spec"]["minReplicas"] and status().get("lastScaleTime"),
             30, "the HPA's status to record the rescale")
