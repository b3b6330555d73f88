"""Helpers of the delivery tests: render the helm chart, find objects in the output, run helm and shellcheck."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml

from hack.localkube.tools import helm_binary
from tests.support.common import REPO_ROOT

CHART = REPO_ROOT / "helm" / "pypto-serving"
KUBE_VERSION = "1.20.2"  # the local cluster's


def helm(*args: str | Path, check: bool = True, kubeconfig: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run helm; with ``check`` a failure raises with its output."""
    command = [str(helm_binary()), *(["--kubeconfig", str(kubeconfig)] if kubeconfig else []), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def set_args(values: dict[str, Any]) -> list[str]:
    """--set-json flags for a flat {dotted.key: value} mapping."""
    import json

    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def template_text(values: dict[str, Any] | None = None, namespace: str = "pypto-system", release: str = "pps",
                  *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart."""
    return helm("template", release, CHART, "--namespace", namespace, "--kube-version", KUBE_VERSION,
                *set_args(values or {}), *extra, check=check)


def render(values: dict[str, Any] | None = None, namespace: str = "pypto-system", release: str = "pps",
           *extra: str) -> list[dict[str, Any]]:
    """The chart's rendered objects."""
    return [doc for doc in yaml.safe_load_all(template_text(values, namespace, release, *extra).stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``/``namespace`` when given)."""
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]
    assert len(hits) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, found {len(hits)}: " \
                           f"{[(d['kind'], d['metadata']['name']) for d in docs]}"
    return hits[0]


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(kind, name, namespace) of every object."""
    return sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs)


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator Deployment's container."""
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def secret_data(secret: dict[str, Any], key: str) -> bytes:
    """A decoded Secret value."""
    return base64.b64decode(secret["data"][key])
