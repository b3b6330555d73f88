"""The one lock: uv.lock agrees with pyproject.toml, the test venv is exactly its resolution, and the pins that
the Makefile and the build use come from it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import tomllib

from hack import lock, lock_check
from tests.support.common import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def uv_lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(lock.uv_path()), "lock", "--check"], cwd=root, capture_output=True, text=True,
                          timeout=600, check=False)


def test_the_lock_agrees_with_pyproject() -> None:
    proc = uv_lock_check(REPO_ROOT)
    assert proc.returncode == 0, f"uv.lock is stale: run `make lock`\n{proc.stderr}"


def test_a_new_dependency_makes_the_lock_stale(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('    "orjson>=3.9",', '    "orjson>=3.9",\n    "six",', 1))
    proc = uv_lock_check(tmp_path)
    assert proc.returncode != 0 and "six" not in (REPO_ROOT / "pyproject.toml").read_text()


def test_this_environment_is_exactly_the_locked_dev_extras() -> None:
    assert lock_check.main(["--extra", "engine", "--extra", "test"]) == 0


def test_differences_name_every_kind_of_drift() -> None:
    locked = {"a": "1.0", "b": "2.0", "c": "3.0"}
    assert lock_check.differences(locked, dict(locked)) == []
    assert lock_check.differences(locked, {"a": "1.0", "b": "2.1", "d": "4.0"}) == [
        "missing: c==3.0", "not in the lock: d==4.0", "b: installed 2.1, locked 2.0"]


def test_the_build_uses_the_locked_setuptools_and_the_pinned_uv() -> None:
    uv_config = PYPROJECT["tool"]["uv"]
    (build,) = uv_config["build-constraint-dependencies"]
    locked = lock.pins_here(lock.export(["engine"]))
    assert build == f"setuptools=={locked['setuptools']}", "pyproject's build constraint must equal the lock's"
    assert uv_config["required-version"] == f"=={lock.uv_version()}", "constraints/uv.txt and pyproject disagree"
    assert re.search(r"--hash=sha256:[0-9a-f]{64}", (REPO_ROOT / "constraints" / "uv.txt").read_text())


def test_the_dev_torch_is_the_cpu_build() -> None:
    locked = lock.pins_here(lock.export(["engine"]))
    assert locked["torch"].endswith("+cpu") and not any(name.startswith("nvidia") for name in locked)
