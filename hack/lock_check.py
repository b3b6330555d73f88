"""Check that this Python environment holds exactly what uv.lock resolves for some extras: no package missing,
none extra, every version equal. ``make install`` runs it after syncing .venv, so CI runs it on every clone.

    .venv/bin/python -m hack.lock_check --extra engine --extra test
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from hack.lock import PROJECT, canonical, export, pins_here


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution in this environment but the project itself."""
    found = {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    found.pop(PROJECT, None)
    return found


def differences(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per package where the environment and the lock disagree; empty when they agree."""
    lines = [f"missing: {name}=={locked[name]}" for name in sorted(set(locked) - set(have))]
    lines += [f"not in the lock: {name}=={have[name]}" for name in sorted(set(have) - set(locked))]
    lines += [f"{name}: installed {have[name]}, locked {locked[name]}"
              for name in sorted(set(locked) & set(have)) if have[name] != locked[name]]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the environment equals the lock's resolution of the extras, else 1 with the differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an extra of pypto-serving (repeatable)")
    parser.add_argument("--uv", type=Path, default=None, help="the uv binary (default: the one `make uv` installs)")
    args = parser.parse_args(argv)
    locked = pins_here(export(args.extra, uv_bin=args.uv))
    problems = differences(locked, installed())
    extras = ",".join(args.extra)
    if problems:
        print(f"{sys.prefix} differs from uv.lock for pypto-serving[{extras}]:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("next step: `make install` syncs it; after editing pyproject.toml run `make lock`", file=sys.stderr)
        return 1
    print(f"{sys.prefix} equals uv.lock for pypto-serving[{extras}] ({len(locked)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
