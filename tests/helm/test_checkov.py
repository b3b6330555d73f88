"""checkov on the rendered chart and on the objects the operator generates (with the chart's defaults): no
finding without a written reason in checkov_skips.yaml, and no reason left without its finding.

checkov runs from its own venv in the cache (`make checkov`, hash-pinned by constraints/checkov.txt); a
missing one is installed here the same way."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pypto_serving.operator import cli as operator_cli
from pypto_serving.operator import desired as d
from pypto_serving.operator.validation import validate
from tests.helm.chartkit import operator_container, template_text
from tests.operator.corpus import minimal
from tests.support.common import CACHE_DIR, REPO_ROOT

SKIPS_FILE = Path(__file__).with_name("checkov_skips.yaml")
CHECKOV_VERSION = re.search(r"^checkov==([0-9.]+)", (REPO_ROOT / "constraints" / "checkov.txt").read_text(),
                            re.M).group(1)  # type: ignore[union-attr]
CHART_VARIANTS = {  # renders of the chart, each scanned
    "default": [],
    "namespace-list": ["--set", "operator.watch.allNamespaces=false", "--set", "operator.watch.namespaces={llm}"],
    "url-webhook": ["-f", str(REPO_ROOT / "examples" / "local" / "values.yaml")],
}


@pytest.fixture(scope="module")
def checkov() -> Path:
    """The pinned checkov binary, installed by `make checkov` when missing."""
    path = Path(os.environ.get("PYPTO_CHECKOV") or CACHE_DIR / f"checkov-{CHECKOV_VERSION}" / "bin" / "checkov")
    if not path.exists():
        subprocess.run(["make", "-s", "checkov"], cwd=REPO_ROOT, check=True, timeout=1200)
    assert path.exists(), f"`make checkov` did not install {path}"
    return path


def operator_objects() -> list[dict[str, Any]]:
    """What the operator creates for a resource using every feature (engine pod, Services, NetworkPolicy,
    control Secret, gateway with an API key), resolved with the defaults the chart passes to the operator."""
    args = [a.replace("$(POD_IP)", "10.1.2.3") for a in operator_container(
        [doc for doc in yaml.safe_load_all(template_text().stdout) if doc])["args"]]
    defaults = operator_cli.operator_defaults(operator_cli.parser().parse_args(args))
    body = minimal("qwen3", replicas=2, parallel={"tensorParallelSize": 4},
                   model={"name": "qwen3", "path": "/models/qwen3", "volume": {"hostPath": {
                       "path": "/data/models", "type": "Directory"}}},
                   devices={"hccnConfPath": "/etc/hccn.conf"}, gateway={"apiKeySecret": {"name": "api-key"}})
    spec, problems = validate(body, defaults)
    assert spec is not None, problems
    owner = d.Owner("qwen3", "llm", "0c6b2f9e-0000-4000-8000-000000000001")
    return [d.engine_pod(owner, spec, 0), *d.children(owner, spec, "pypto-system"),
            d.control_secret(owner, "0" * 64)]


def scan(checkov: Path, files: list[Path]) -> list[dict[str, Any]]:
    """checkov's failed checks over ``files`` (kubernetes framework, no network)."""
    result = subprocess.run([str(checkov), "--framework", "kubernetes", "--skip-download", "--quiet", "--compact",
                             "-o", "json", "-f", *map(str, files)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"}, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports), reports
    assert sum(r["summary"]["resource_count"] for r in reports) > 20
    return [check for r in reports for check in r["results"]["failed_checks"]]


def test_checkov_finds_nothing_without_a_written_reason(checkov: Path, tmp_path: Path) -> None:
    files = []
    for name, extra in CHART_VARIANTS.items():
        files.append(tmp_path / f"chart-{name}.yaml")
        files[-1].write_text(template_text(None, "pypto-system", "pps", *extra).stdout)
    files.append(tmp_path / "operator-objects.yaml")
    files[-1].write_text(yaml.safe_dump_all(operator_objects()))
    skips = yaml.safe_load(SKIPS_FILE.read_text())
    assert all(len(s["reason"].split()) >= 15 for s in skips), "every accepted finding needs a real reason"
    used: set[int] = set()
    unexplained = []
    for check in scan(checkov, files):
        hits = [i for i, s in enumerate(skips) if s["check"] == check["check_id"] and any(
            fnmatch.fnmatchcase(check["resource"], pattern) for pattern in s["resources"])]
        used.update(hits)
        if not hits:
            unexplained.append(f"{check['check_id']} {check['check_name']}: {check['resource']} "
                               f"({Path(check['file_path']).name})")
    assert not unexplained, "checkov findings without a reason in checkov_skips.yaml:\n" + "\n".join(unexplained)
    stale = [f"{s['check']} {s['resources']}" for i, s in enumerate(skips) if i not in used]
    assert not stale, f"checkov_skips.yaml entries that match no finding any more (remove them): {stale}"
