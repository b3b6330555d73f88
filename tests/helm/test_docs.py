"""User docs: the generated CRD reference is fresh, links and make targets in the docs exist, the README covers
what a user needs, and architecture.md has the diagram of the parts."""

from __future__ import annotations

import re

import pytest

from hack import crd_reference
from tests.support.common import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
DOCS = {path: path.read_text() for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]}


def test_crd_reference_is_generated_from_the_models() -> None:
    committed = (REPO_ROOT / "docs" / "crd-reference.md").read_text()
    assert committed == crd_reference.render(), "docs/crd-reference.md is stale: run `make docs`"
    for field in ("spec.parallel.tensorParallelSize", "spec.devices.resourceName", "spec.gateway.routing",
                  "spec.drain.timeoutSeconds", "status.replicaStatuses[].pod"):
        assert f"`{field}`" in committed


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_point_at_files(path: object) -> None:
    text = DOCS[path]  # type: ignore[index]
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        resolved = (path.parent / target).resolve()  # type: ignore[attr-defined]
        assert resolved.exists(), f"{path}: link to {target} ({resolved}) is broken"


def test_make_targets_in_the_docs_exist() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, re.MULTILINE))
    for path, text in DOCS.items():
        for target in re.findall(r"`make ([a-z][\w-]*)", text):
            assert target in targets, f"{path.name} mentions `make {target}`, which the Makefile lacks"


def test_readme_covers_what_a_user_needs() -> None:
    for heading in ("## Two commands", "## Quickstart on a real cluster", "## The PyptoServing resource",
                    "## Routing policies", "## Scaling and draining", "## Ascend notes", "## Troubleshooting",
                    "## What was tested, and on which hardware", "### kind, for users with Docker"):
        assert heading in README, heading
    for fact in ("make demo", "make test", "make demo-down", "docs/crd-reference.md", "HCCL_IF_IP", "hccn.conf",
                 "/dev/shm", "huawei.com/Ascend910", "CPU only", "hack/kind-e2e.sh", "examples/hpa.yaml"):
        assert fact in README, fact
    from pypto_serving.operator.types import ROUTING_POLICIES

    for policy in ROUTING_POLICIES:
        assert f"`{policy}`" in README, f"routing policy {policy} is not documented"


def test_architecture_has_the_diagram_of_the_parts() -> None:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1
    diagram = blocks[0]
    assert diagram.startswith("flowchart")
    for part in ("kube-apiserver", "operator pod", "gateway", "engine pod", "Ascend device plugin", "OpenAI client"):
        assert part in diagram, part
    assert "## Delivery" in text
