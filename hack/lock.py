"""The one lock (uv.lock) and the uv that reads it: where uv is, and what the lock resolves for some extras.

Every version list of the project comes from here: the development venv (``make install``, checked by
``hack.lock_check``) and the images' pins (``hack.image_constraints``). Nothing is listed by hand.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK = REPO_ROOT / "uv.lock"
UV_PIN = REPO_ROOT / "constraints" / "uv.txt"
PROJECT = "pypto-serving"


def canonical(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def uv_version() -> str:
    """The uv release constraints/uv.txt pins (the Makefile installs exactly it)."""
    found = re.search(r"^uv==([0-9][0-9.]*)", UV_PIN.read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"{UV_PIN} pins no uv release: run `make lock`")
    return found.group(1)


def uv_path() -> Path:
    """The uv binary `make uv` installs: $PYPTO_UV, else <cache>/uv-<version>/bin/uv."""
    if os.environ.get("PYPTO_UV"):
        return Path(os.environ["PYPTO_UV"])
    cache = Path(os.environ.get("PYPTO_CACHE_DIR") or Path.home() / ".cache" / "pypto-serving")
    path = cache / f"uv-{uv_version()}" / "bin" / "uv"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `make uv` (or `make install`)")
    return path


def uv(*args: str, uv_bin: Path | None = None) -> str:
    """Run uv in the repository root; its stdout. A failure raises with uv's own message."""
    proc = subprocess.run([str(uv_bin or uv_path()), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
    if proc.returncode != 0:
        raise RuntimeError(f"uv {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def export(extras: Iterable[str], prune: Iterable[str] = (), uv_bin: Path | None = None) -> list[str]:
    """The lock's resolution of pypto-serving[extras] as requirement lines ``name==version ; markers``, the
    project itself left out, and ``prune``d packages left out with what only they need."""
    args = ["export", "--frozen", "--format", "requirements.txt", "--no-emit-project", "--no-hashes",
            "--no-header", "--no-annotate"]
    args += [f"--extra={extra}" for extra in extras] + [f"--prune={name}" for name in prune]
    return [line.strip() for line in uv(*args, uv_bin=uv_bin).splitlines()
            if line.strip() and not line.startswith(("#", "-"))]


def pins_here(lines: Iterable[str]) -> dict[str, str]:
    """{normalized name: version} of the requirement lines whose markers hold for this interpreter."""
    pins: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier
        pins[canonical(req.name)] = spec.version
    return pins
