"""Generate docs/crd-reference.md from the PyptoServing pydantic models (operator/types.py).

    python -m hack.crd_reference           # write docs/crd-reference.md (make docs)
    python -m hack.crd_reference --check   # exit 1 when the committed file is stale

The tables come from the same structural schema the CRD is generated from (`pypto_serving.operator.crd`), so
types, defaults, enums and bounds are exactly what the apiserver enforces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hack.generated import write_or_check
from pypto_serving.operator import crd
from pypto_serving.operator import types as t

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "crd-reference.md"


def _type(node: dict[str, Any]) -> str:
    """A short type name: string, integer, []string, object, map[string]string."""
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type(node['additionalProperties'])}"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    return str(kind)


def _code(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == {}:
        return "`{}`"
    return f"`{value}`"


def _rules(node: dict[str, Any]) -> str:
    """Validation: enum, bounds, lengths."""
    out = []
    if "enum" in node:
        out.append("one of " + ", ".join(_code(v) for v in node["enum"]))
    for key, text in (("minimum", ">= {}"), ("maximum", "<= {}"), ("exclusiveMinimum", "> {}"),
                      ("minLength", "length >= {}"), ("maxLength", "length <= {}"), ("pattern", "pattern `{}`")):
        if key in node:
            out.append(text.format(node[key]))
    return "; ".join(out)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(node: dict[str, Any], path: str, required: bool = False) -> list[str]:
    """Table rows for ``node`` at ``path`` and every field below it (depth first, in model order)."""
    out: list[str] = []
    if path:
        default = _code(node["default"]) if "default" in node else ""
        out.append(f"| `{path}`{' (required)' if required else ''} | {_type(node)} | {default} | "
                   f"{_escape(_rules(node))} | {_escape(node.get('description', ''))} |")
    needed = set(node.get("required", []))
    for name, child in (node.get("properties") or {}).items():
        out += rows(child, f"{path}.{name}" if path else name, name in needed)
    items = node.get("items")
    if isinstance(items, dict) and items.get("properties"):
        for name, child in items["properties"].items():
            out += rows(child, f"{path}[].{name}", name in set(items.get("required", [])))
    return out


def table(schema: dict[str, Any], root: str) -> str:
    """One markdown table for a top-level schema."""
    head = "| field | type | default | validation | description |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows(schema, root))


def render() -> str:
    """The whole reference page."""
    body = crd.build_crd()
    version = body["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    columns = ", ".join(c["name"] for c in version["additionalPrinterColumns"])
    spec = crd.model_schema(t.PyptoServingSpec)
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return f"""# PyptoServing CRD reference

<!-- Generated from operator/types.py by `make docs` (python -m hack.crd_reference). Do not edit by hand;
     tests/helm/test_docs.py fails when this file is stale. -->

`apiVersion: {t.API_VERSION}`, `kind: {t.KIND}`, plural `{t.PLURAL}`, short name `{", ".join(t.SHORT_NAMES)}`,
namespaced. Subresources: `status`, and `scale` (`{scale["specReplicasPath"]}`, `{scale["statusReplicasPath"]}`,
selector `{scale["labelSelectorPath"]}`), so `kubectl scale pps NAME --replicas=N` and a HorizontalPodAutoscaler
work (examples/hpa.yaml). Printer columns: {columns}.

Types, defaults, enums and bounds below are enforced by the apiserver (the CRD's OpenAPI schema). On top of them
the operator's admission webhook and its reconciler run the semantic checks of `operator/validation.py` (e.g.
`tensorParallelSize x pipelineParallelSize` above `devices.perNode` must split evenly into the pods of a serving
group, and a pipeline may not span them yet; the model path must be absolute; the flags and env vars the operator
sets itself may not be overridden in `engine.extraArgs` / `engine.env`); a rejected resource gets a message naming
the field, and one that reached the cluster without the webhook gets phase `Invalid` and condition
`SpecValid=False`.

Examples: [examples/serving.yaml](../examples/serving.yaml) (Qwen3-14B on Ascend 910),
[examples/local/serving.yaml](../examples/local/serving.yaml) (the tiny model on the local cluster).

## spec

{table(spec, "spec")}

## status

Written by the operator only.

{table(status, "status")}
"""


def main(argv: list[str] | None = None) -> int:
    """Write or check docs/crd-reference.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/crd-reference.md is stale")
    args = parser.parse_args(argv)
    return write_or_check(OUTPUT, render(), args.check, "make docs")


if __name__ == "__main__":
    sys.exit(main())
