"""Generate the PyptoServing CustomResourceDefinition from the pydantic models in `types.py`.

pydantic's JSON schema is turned into a Kubernetes *structural* OpenAPI v3 schema: ``$ref`` inlined,
``Optional[X]`` collapsed to ``X`` (absent means unset), free-form corev1 objects marked
``x-kubernetes-preserve-unknown-fields``, object defaults reduced to ``{}`` so the apiserver fills nested
defaults itself. ``pypto-serving crd`` prints it; ``make crds`` writes ``crds/``; a test fails when stale.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml

from pypto_serving.contract import APP, L_NAME
from pypto_serving.operator import types as t

CRD_NAME = f"{t.PLURAL}.{t.GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas",
     "description": "Desired DP replicas (serving groups)"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas",
     "description": "Ready replicas (groups whose pods are all Ready)"},
    {"name": "TP", "type": "integer", "jsonPath": ".spec.parallel.tensorParallelSize",
     "description": "Tensor-parallel size"},
    {"name": "Devices/Replica", "type": "integer", "jsonPath": ".status.devicesPerReplica",
     "description": "Devices per replica (TP x PP)"},
    {"name": "Pods/Group", "type": "integer", "jsonPath": ".status.podsPerGroup", "priority": 1,
     "description": "Pods per serving group"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Overall phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP_KEYS = {"title"}


def _is_free_form(node: dict[str, Any]) -> bool:
    """A dict[str, Any] in pydantic's schema: an object with arbitrary values."""
    return node.get("type") == "object" and "properties" not in node and node.get("additionalProperties") in (
        True, None, {})


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Convert one pydantic JSON-schema node (recursively) to a structural Kubernetes schema node."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:  # inline the definition; property-level keys (description, default) win
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update(node)
        node = target
    if "anyOf" in node:  # Optional[X] -> X; the apiserver treats an absent field as unset
        options = [opt for opt in node.pop("anyOf") if opt.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        merged = dict(options[0])
        merged.update(node)
        node = structural(merged, defs)
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default":
            if value is None:
                continue
            if isinstance(value, dict):
                value = {}  # nested defaults are applied by the apiserver from the child schemas
        if key == "properties":
            value = {name: structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = structural(value, defs)
        out[key] = value
    if out.get("additionalProperties") is False:
        del out["additionalProperties"]  # structural schemas prune unknown fields instead
    if _is_free_form(out):
        out.pop("additionalProperties", None)
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("default") == [] and "items" in out:
        out.pop("default")  # empty-list defaults only add noise to stored objects
    head = {key: out.pop(key) for key in ("type", "description") if key in out}
    return {**head, **out}


def model_schema(model: type[t.BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    return structural(raw, defs)


def _without_defaults(node: Any) -> Any:
    """Drop defaults (the status is written by the operator only; defaults there would only add noise)."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def build_crd() -> dict[str, Any]:
    """The full CustomResourceDefinition (apiextensions.k8s.io/v1) for PyptoServing."""
    spec_schema = model_schema(t.PyptoServingSpec)
    status_schema = _without_defaults(model_schema(t.PyptoServingStatus))
    schema = {
        "type": "object",
        "description": "PyptoServing runs data-parallel LLM engine replicas on Ascend NPUs, plus a gateway.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {L_NAME: APP}},
        "spec": {
            "group": t.GROUP,
            "scope": "Namespaced",
            "names": {"kind": t.KIND, "listKind": f"{t.KIND}List", "plural": t.PLURAL, "singular": t.SINGULAR,
                      "shortNames": list(t.SHORT_NAMES), "categories": ["all", "pypto"]},
            "versions": [{
                "name": t.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render(docs: list[dict[str, Any]]) -> str:
    """YAML text of the given documents, with a header naming the generator."""
    header = "# Generated from operator/types.py by `make crds` (pypto-serving crd). Do not edit by hand.\n"
    return header + "---\n".join(yaml.safe_dump(doc, sort_keys=False, width=120) for doc in docs)


def main(argv: list[str] | None = None) -> int:
    """Print the generated CRD."""
    parser = argparse.ArgumentParser(prog="pypto-serving crd", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    sys.stdout.write(render([build_crd()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
