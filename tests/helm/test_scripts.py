"""Shell scripts are shellcheck-clean (hack/kind-e2e.sh cannot run here: no Docker engine; this is its CI check)."""

from __future__ import annotations

import shutil
import subprocess

from tests.support.common import REPO_ROOT

SCRIPTS = sorted([*REPO_ROOT.glob("hack/*.sh"), REPO_ROOT / ".ci" / "run"])


def test_shellcheck_is_installed_by_make_tools() -> None:
    assert shutil.which("shellcheck"), "shellcheck is missing: run `make tools` (it installs Debian's shellcheck)"
    assert "shellcheck" in (REPO_ROOT / "hack" / "install-tools.sh").read_text()


def test_shell_scripts_are_shellcheck_clean() -> None:
    assert REPO_ROOT / "hack" / "kind-e2e.sh" in SCRIPTS
    result = subprocess.run(["shellcheck", "--shell=bash", "--external-sources", *map(str, SCRIPTS)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kind_e2e_does_what_the_readme_says() -> None:
    script = (REPO_ROOT / "hack" / "kind-e2e.sh").read_text()
    for step in ("kind create cluster", "huawei.com~1Ascend910", "docker build --target engine",
                 "docker build --target operator", "docker build --target gateway", "kind load docker-image",
                 "helm upgrade --install", "examples/local/serving.yaml", "/v1/completions", "/v1/chat/completions"):
        assert step in script, step
    assert "set -euo pipefail" in script and "trap cleanup EXIT" in script
    assert "hack/kind-e2e.sh" in (REPO_ROOT / "README.md").read_text()
