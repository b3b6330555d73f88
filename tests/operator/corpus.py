"""The invalid-resource corpus (invalid_corpus.yaml) and a valid base resource, shared by unit and cluster tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CORPUS_FILE = Path(__file__).with_name("invalid_corpus.yaml")


@dataclass(frozen=True)
class InvalidCase:
    """One invalid resource and the rejection it must get."""

    name: str
    stage: str  # "schema" (CRD OpenAPI) or "webhook" (semantic check)
    field: str
    expect: str
    body: dict[str, Any]


def load_corpus() -> list[InvalidCase]:
    """Every document of the corpus."""
    cases = []
    for doc in yaml.safe_load_all(CORPUS_FILE.read_text()):
        notes = doc["metadata"]["annotations"]
        cases.append(InvalidCase(name=doc["metadata"]["name"], stage=notes["test.pypto.io/stage"],
                                 field=notes["test.pypto.io/field"], expect=notes["test.pypto.io/expect"], body=doc))
    return cases


def minimal(name: str = "demo", **spec: Any) -> dict[str, Any]:
    """A minimal valid PyptoServing (name, model, tensorParallelSize) with spec overrides."""
    body: dict[str, Any] = {
        "apiVersion": "serving.pypto.io/v1alpha1", "kind": "PyptoServing", "metadata": {"name": name},
        "spec": {"model": {"name": "tiny", "path": "/models/tiny"}, "parallel": {"tensorParallelSize": 1}},
    }
    body["spec"].update(spec)
    return body
