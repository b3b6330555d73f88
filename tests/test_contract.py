"""One contract: every name the parts share comes from pypto_serving.contract, and the parts agree on it.

The static test fails when a part spells a shared name itself (a second source of truth); the others hand what
one part writes to the part that reads it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pypto_serving import contract as c
from pypto_serving.contract import LoadReport
from pypto_serving.gateway.discovery import pod_entry
from pypto_serving.gateway.replicas import LoadReading
from pypto_serving.operator import desired as d
from pypto_serving.operator.defaults import resolve
from pypto_serving.operator.types import PyptoServingSpec
from tests.operator.corpus import minimal
from tests.support.common import REPO_ROOT

PARTS = ("engine", "gateway", "operator")
# Every string constant of the contract long enough to be a name rather than a word ("http", "engine").
SHARED = {value for name, value in vars(c).items()
          if name.isupper() and isinstance(value, str) and ("/" in value or "-" in value or "_" in value)
          and len(value) > 6 and value != c.APP}  # APP is also the product's name (OpenAI owned_by, logs)


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_the_contract_names_are_spelled_only_in_the_contract() -> None:
    assert {"serving.pypto.io/draining", "x-request-id", "PYPTO_TP_SIZE", "huawei.com/AscendReal"} <= SHARED
    offenders = []
    for part in PARTS:
        for path in sorted((REPO_ROOT / part).rglob("*.py")):
            for literal in string_literals(path) & SHARED:
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {literal!r}")
    assert not offenders, "import these from pypto_serving.contract instead:\n" + "\n".join(offenders)


def test_the_contract_imports_without_torch_or_the_parts() -> None:
    code = ("import sys, pypto_serving.contract; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('pypto_serving.engine', "
            "'pypto_serving.gateway', 'pypto_serving.operator'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_operators_engine_pod_is_what_the_gateway_discovers() -> None:
    spec = resolve(PyptoServingSpec.model_validate(minimal(replicas=2)["spec"]))
    pod = d.engine_pod(d.Owner("demo", "ns", "uid"), spec, 1)
    pod["status"] = {"podIP": "10.0.0.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    assert pod_entry(pod, default_port=1) == ("demo-dp-1", f"http://10.0.0.7:{c.ENGINE_PORT}", "ready")
    pod["metadata"]["labels"][c.L_DRAINING] = "true"  # what the operator's drain writes
    assert pod_entry(pod)[2] == "draining"
    selector = dict(pair.split("=") for pair in d.selector_string(d.engine_selector("demo")).split(","))
    assert selector.items() <= pod["metadata"]["labels"].items()


def test_the_gateway_routes_to_a_groups_serving_pod_only_while_the_operator_says_the_group_is_ready() -> None:
    spec = resolve(PyptoServingSpec.model_validate(
        minimal(parallel={"tensorParallelSize": 4}, devices={"perNode": 2})["spec"]))
    owner = d.Owner("demo", "ns", "uid")
    running = {"podIP": "10.0.0.7", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    leader = {**d.engine_pod(owner, spec, 0, where=d.GroupPod(0, 0)), "status": running}
    worker = {**d.engine_pod(owner, spec, 0, where=d.GroupPod(0, 1, "10.0.0.7")), "status": running}
    assert pod_entry(worker) is None  # a worker runs model ranks only: never a replica
    assert pod_entry(leader)[2] == "not-ready"  # created with group-ready false
    leader["metadata"]["labels"][c.L_GROUP_READY] = "true"  # what the operator writes once every pod is Ready
    assert pod_entry(leader) == ("demo-dp-0-0", f"http://10.0.0.7:{c.ENGINE_PORT}", "ready")
    leader["metadata"]["labels"][c.L_DRAINING] = "true"
    assert pod_entry(leader)[2] == "draining"


def test_a_load_report_reads_the_same_in_the_operator_and_the_gateway() -> None:
    sent = LoadReport(running=2, waiting=1, pending_tokens=300, kv_cache_usage=0.25, draining=True, max_num_seqs=8)
    wire = sent.to_json()
    assert LoadReport.parse(wire) == sent and LoadReport.parse(wire).in_flight == 3
    reading = LoadReading.from_json(wire, 1.0, 2.0)
    assert (reading.running, reading.waiting, reading.pending_tokens, reading.kv_cache_usage, reading.draining,
            reading.max_num_seqs) == (2, 1, 300, 0.25, True, 8)
    assert "max_num_seqs" not in LoadReport().to_json()  # not before the engine is loaded
    with pytest.raises(ValueError, match="running"):
        LoadReport.parse({"running": -1})
