"""Packaging: the CONTRACT.md layout works editable and as a built wheel, operator/gateway without torch."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.common import REPO_ROOT


def run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_editable_install_imports_every_part() -> None:
    out = run([sys.executable, "-c", "import pypto_serving.operator, pypto_serving.engine, pypto_serving.gateway,"
               " pypto_serving.cli; print(pypto_serving.operator.__file__)"], cwd=Path("/"))
    assert out.strip().endswith("operator/__init__.py")


def test_repo_root_never_shadows_stdlib_operator() -> None:
    # `python -m` puts the working directory first on sys.path: the stdlib must still win.
    out = run([sys.executable, "-c", "import operator, collections; print(operator.__file__, operator.eq(1, 1))"],
              cwd=REPO_ROOT)
    assert "operator.py True" in out and str(REPO_ROOT / "operator") not in out


def test_console_script_dispatches() -> None:
    out = run([str(Path(sys.executable).parent / "pypto-serving"), "--help"])
    for name in ("engine", "gateway", "operator", "tiny-model", "bench"):
        assert f"  {name}" in out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        cwd=REPO_ROOT)
    (whl,) = out.glob("pypto_serving-*.whl")
    return whl


def test_wheel_layout(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "pypto_serving/operator/__init__.py" in names
    assert "pypto_serving/engine/__init__.py" in names
    assert not any(n.startswith(("operator/", "engine/", "gateway/")) for n in names)
    # every module of the three parts is shipped
    for part in ("operator", "engine", "gateway"):
        for py in (REPO_ROOT / part).rglob("*.py"):
            assert f"pypto_serving/{py.relative_to(REPO_ROOT)}" in names, f"{py} missing from the wheel"


def test_wheel_operator_and_gateway_import_without_torch(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    # as the slim images install it: pinned by constraints/image.txt, generated from uv.lock
    run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--constraint",
         str(REPO_ROOT / "constraints" / "image.txt"), str(wheel)], cwd=tmp_path)
    code = ("import importlib.util, sys; import pypto_serving.operator, pypto_serving.gateway, pypto_serving.cli;"
            " assert importlib.util.find_spec('torch') is None, 'torch must not be installed here';"
            " assert 'torch' not in sys.modules; print('ok')")
    assert run([py, "-c", code], cwd=tmp_path).strip() == "ok"
