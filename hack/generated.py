"""Files the repository commits but a script generates: write them, or with ``--check`` say they are stale."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(output: Path, text: str, check: bool, regenerate: str, summary: str = "") -> int:
    """With ``check``: 0 when ``output`` holds ``text``, else 1 and how to regenerate it (``regenerate``, a command).
    Without: write ``text`` and say so (``summary`` appended). Returns the exit status."""
    if check:
        if not output.exists() or output.read_text() != text:
            print(f"{output} is stale: run `{regenerate}`", file=sys.stderr)
            return 1
        return 0
    output.write_text(text)
    print(f"wrote {output}{summary}")
    return 0
