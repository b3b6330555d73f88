"""The CRD generated from the pydantic models: committed copy fresh, structural, contract shape."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pypto_serving.operator import crd
from tests.support.common import REPO_ROOT

CRDS = REPO_ROOT / "crds"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for name, child in (node.get("properties") or {}).items():
            out += walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            out += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crd_is_fresh() -> None:
    committed = (CRDS / crd.CRD_FILE).read_text()
    assert committed == crd.render([crd.build_crd()]), f"crds/{crd.CRD_FILE} is stale: run `make crds` and commit it"


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert banned not in node, f"{path} has {banned}"
        if "default" in node:
            assert node["default"] is not None, path
        assert node.get("additionalProperties") is not False, path


def test_contract_shape() -> None:
    doc = crd.build_crd()
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "pyptoservings.serving.pypto.io"
    assert spec["names"]["shortNames"] == ["pps"] and spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert "status" in version["subresources"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Replicas", "Ready", "TP", "Devices/Replica", "Pods/Group", "Phase", "Age"]
    nodes = dict(walk(version["schema"]["openAPIV3Schema"]))
    assert nodes[".spec.replicas"]["minimum"] == 0 and nodes[".spec.replicas"]["default"] == 1
    assert nodes[".spec.parallel.tensorParallelSize"]["minimum"] == 1
    assert "tensorParallelSize" in nodes[".spec.parallel"]["required"]
    assert set(nodes[".spec"]["required"]) == {"model", "parallel"}
    assert nodes[".spec.gateway.routing"]["enum"] == [
        "least-pending-tokens", "round-robin", "least-requests", "prefix-aware", "session"]
    assert nodes[".spec.engine.dtype"]["enum"] == ["auto", "bfloat16", "float16", "float32"]
    assert nodes[".spec.drain.timeoutSeconds"]["minimum"] == 0
    assert nodes[".spec.model.volume"]["x-kubernetes-preserve-unknown-fields"] is True
    assert nodes[".spec.parallel.expertParallel.all2allBackend"]["default"] == "default"
    # object defaults are {} so the apiserver fills the nested defaults of a minimal resource
    for section in ("devices", "engine", "gateway", "rollout", "drain"):
        assert nodes[f".spec.{section}"]["default"] == {}, section
    assert nodes[".status.phase"]["enum"] == ["Pending", "Progressing", "Ready", "Degraded", "Invalid"]
    assert nodes[".status.selector"]["type"] == "string"


def test_main_prints_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main([]) == 0
    (doc,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert doc == crd.build_crd()
