"""Write constraints/image.txt, the images' pins, from uv.lock: the runtime closure of pypto-serving[engine].

The operator and gateway images install the base package and the engine image adds the ``engine`` extra; one
file pins both, since a constraint on a package an image does not install is ignored. torch, and what only
torch needs, is left out: the Dockerfile pins torch with a build arg so an Ascend build can use the torch that
matches its torch-npu. The lines keep uv's markers, so a Python 3.10 CANN base gets the 3.10 resolution. Run
``make lock`` after changing dependencies; a test fails while this file and the lock disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hack.generated import write_or_check
from hack.lock import REPO_ROOT, export

OUTPUT = REPO_ROOT / "constraints" / "image.txt"
EXTRAS = ("engine",)
UNPINNED = ("torch",)  # pinned by the Dockerfile's TORCH_VERSION build arg
HEADER = """\
# Exact versions the container images install (Dockerfile: pip install --constraint constraints/image.txt ...):
# uv.lock's resolution of pypto-serving[engine] with torch, and what only torch needs, pruned (the Dockerfile
# pins torch with its TORCH_VERSION build arg). Generated from uv.lock by hack/image_constraints.py
# (`make lock`); do not edit.
"""


def render(lines: list[str]) -> str:
    """The constraints file text."""
    return HEADER + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) constraints/image.txt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the lock")
    parser.add_argument("--uv", type=Path, default=None, help="the uv binary (default: the one `make uv` installs)")
    args = parser.parse_args(argv)
    lines = export(EXTRAS, prune=UNPINNED, uv_bin=args.uv)
    return write_or_check(OUTPUT, render(lines), args.check, "make lock", f" ({len(lines)} pins)")


if __name__ == "__main__":
    sys.exit(main())
