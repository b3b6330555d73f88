"""The Dockerfile, read (no Docker engine runs here): targets, entrypoints, pins, users, build context.

Every image target must start a real `pypto-serving` subcommand (its `--help` must work), pin its base image
and Python packages, run as a non-root user, and only COPY what .dockerignore lets into the context.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hack import image_constraints, lock
from pypto_serving.cli import SUBCOMMANDS
from tests.support.common import REPO_ROOT

TARGETS = {"engine": "engine", "operator": "operator", "gateway": "gateway"}  # target -> subcommand
PYPTO = str(Path(sys.executable).parent / "pypto-serving")


@dataclass
class Stage:
    """One FROM ... AS name block."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        """The argument of the stage's last ``keyword`` instruction."""
        found = [arg for key, arg in self.instructions if key == keyword]
        return found[-1] if found else None


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuation lines joined, comments dropped)."""
    logical, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"every stage must be named: FROM {rest}"
            current = Stage(match.group(2), match.group(1))
            stages[current.name] = current
        elif current is None:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return args, stages


ARGS, STAGES = parse((REPO_ROOT / "Dockerfile").read_text())


def resolved(stage: Stage, keyword: str) -> str | None:
    """The instruction's value in this stage or the stage it is built FROM."""
    while True:
        value = stage.last(keyword)
        if value is not None or stage.base not in STAGES:
            return value
        stage = STAGES[stage.base]


def base_image(stage: Stage) -> str:
    """The external image a stage starts from (stage chains and ${ARG} defaults resolved)."""
    while stage.base in STAGES:
        stage = STAGES[stage.base]
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], stage.base)


@pytest.mark.parametrize(("target", "subcommand"), TARGETS.items())
def test_target_entrypoint_is_a_real_subcommand(target: str, subcommand: str) -> None:
    stage = STAGES[target]
    entrypoint = json.loads(resolved(stage, "ENTRYPOINT") or "null")
    assert entrypoint == ["pypto-serving", subcommand], f"{target}: ENTRYPOINT {entrypoint}"
    assert subcommand in SUBCOMMANDS
    cmd = json.loads(resolved(stage, "CMD") or "[]")
    proc = subprocess.run([PYPTO, subcommand, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in (c for c in cmd if c.startswith("--")):  # the default CMD uses real flags
        assert flag in proc.stdout, f"{target}: CMD flag {flag} is not in `pypto-serving {subcommand} --help`"


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_as_non_root_from_a_pinned_base(target: str) -> None:
    stage = STAGES[target]
    user = resolved(stage, "USER")
    assert user, f"{target} has no USER"
    uid = user.split(":")[0]
    if uid.startswith("${"):
        uid = next(arg.split("=", 1)[1] for key, arg in stage.instructions
                   if key == "ARG" and arg.startswith(uid[2:-1] + "="))
    assert uid not in ("0", "root"), f"{target} runs as root"
    image = base_image(stage)
    name, _, tag = image.rpartition(":")
    assert name and re.fullmatch(r"\d+\.\d+\.\d+-[\w.-]+", tag), f"{target}: base image {image} is not pinned"


def test_slim_targets_have_no_torch_and_the_engine_pins_it() -> None:
    for target in ("operator", "gateway"):
        text = " ".join(arg for stage in (STAGES[target], STAGES[STAGES[target].base])
                        for _, arg in stage.instructions)
        assert "torch" not in text and "[engine]" not in text
    engine = " ".join(arg for _, arg in STAGES["engine"].instructions)
    assert "torch==${TORCH_VERSION}" in engine and "[engine]" in engine and "TORCH_NPU_VERSION" in engine
    locked = lock.pins_here(lock.export(["engine"]))["torch"].split("+")[0]
    assert f"ARG TORCH_VERSION={locked}\n" in (REPO_ROOT / "Dockerfile").read_text(), \
        f"the engine image's torch must be the version the tests ran with (uv.lock: {locked})"
    for stage in STAGES.values():
        for key, arg in stage.instructions:
            if key == "RUN" and "pip install" in arg and "pypto_serving" in arg:
                assert "--constraint /tmp/image.txt" in arg, f"{stage.name}: unpinned pip install"


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here (last match wins, ! re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or (
            pat.startswith("**/") and (fnmatch.fnmatch(path, pat[3:]) or fnmatch.fnmatch(path, "*/" + pat[3:])))
        if hit:
            result = not negate
    return result


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources: list[str] = []
    for stage in STAGES.values():
        for key, arg in stage.instructions:
            if key == "COPY" and "--from=" not in arg:
                sources += arg.split()[:-1]
            if key == "RUN":
                sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", arg)
    assert sources
    for source in sources:
        path = source.rstrip("/")
        assert (REPO_ROOT / path).exists(), f"COPY {source}: missing"
        assert not ignored(path, patterns), f"COPY {source}: excluded by .dockerignore"
        if (REPO_ROOT / path).is_dir():
            assert not ignored(f"{path}/__init__.py", patterns)
    for private in (".venv/bin/python", ".git/HEAD", ".work/demo/kubeconfig", "tests/conftest.py",
                    "engine/__pycache__/x.pyc", "helm/pypto-serving/values.yaml"):
        assert ignored(private, patterns), f"{private} would be sent to the Docker daemon"


def test_image_constraints_are_generated_from_the_lock() -> None:
    assert image_constraints.main(["--check"]) == 0, "constraints/image.txt and uv.lock disagree: run `make lock`"


def test_image_constraints_pin_every_runtime_package() -> None:
    pins = {}
    for line in (REPO_ROOT / "constraints" / "image.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints/image.txt: {line!r} is not an exact pin"
            if req.marker is None or req.marker.evaluate():
                pins[lock.canonical(req.name)] = spec.version
    assert "torch" not in pins and "sympy" not in pins, "torch and what only torch needs come from the build arg"
    # the direct dependencies' pins satisfy pyproject.toml
    from importlib import metadata

    for line in metadata.distribution("pypto-serving").requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": "engine"}):
            continue
        name = lock.canonical(req.name)
        if name in image_constraints.UNPINNED:
            continue
        assert name in pins, f"constraints/image.txt lacks {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
