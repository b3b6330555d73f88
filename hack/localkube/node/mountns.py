"""Enter a container: bind-mount its volumes in the (already private) mount namespace, enter its working
directory, exec its command.

Run as ``unshare --mount --propagation private -- python -I -S mountns.py PLAN.json -- COMMAND...`` (the node
agent builds the line with ``volumes.container_command``). Standard library only, so it starts in a few
milliseconds and does not depend on the agent's imports.

Every mount source is opened with ``O_PATH`` *before the first mount*, and each bind mount takes its source
from ``/proc/self/fd/N`` (the kernel follows that link to the opened file itself, not to its path). So a
mount over an ancestor of a later source cannot hide it: with the cluster directory under /tmp, an emptyDir
mounted at /tmp would otherwise shadow every later volume's host directory (the ServiceAccount token's too).
``O_PATH`` also opens sockets, FIFOs and device nodes without side effects. Mount points missing on the host are
created as empty directories or files (as root), like a container runtime does inside an image.

The pod's "image" is the host's project environment (virtualenv, repository, base interpreter), listed in the
plan's ``image``. A volume mounted over an ancestor of one of those (an emptyDir at /tmp while the checkout lives
under /tmp, as in CI) would hide the interpreter and packages the container runs from; such a hidden image
directory is bound back, from the fd opened before the first mount, at its own path inside the volume (where a
real container would keep seeing its image's files too).

The plan (JSON): ``{"mounts": [{"source": ..., "target": ..., "readOnly": bool}, ...], "image": [dir, ...],
"workingDir": "/"}``, mounts in order (parents before children).
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys
from typing import Any

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000


class MountError(RuntimeError):
    """A mount of the plan failed (the message names source and target)."""


def _libc_mount(libc: Any, source: str | None, target: str, flags: int) -> None:
    """mount(2) without a filesystem type or data; raises MountError with errno's text."""
    if libc.mount(source.encode() if source is not None else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise MountError(f"mount {source or '(remount)'} on {target}: {os.strerror(err)}")


def _mount_point(target: str, directory: bool) -> None:
    """Create the mount point (a directory, or an empty file for a file source) when it is missing."""
    if directory:
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
    if not os.path.lexists(target):
        with open(target, "ab"):
            pass


def _shows(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file opened as ``fd`` (no mount hides it)."""
    try:
        seen, opened = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (seen.st_dev, seen.st_ino) == (opened.st_dev, opened.st_ino)


def _restore_image(libc: Any, image: list[tuple[str, int]]) -> None:
    """Bind every image directory a volume now hides back at its path (parents first)."""
    for path, fd in sorted(image, key=lambda entry: len(entry[0])):
        if _shows(path, fd):
            continue
        try:
            _mount_point(path, True)
        except OSError as exc:  # e.g. a read-only volume over it: the container runs without it, as it would
            print(f"localkube: a volume hides {path} and it cannot be restored: {exc.strerror}", file=sys.stderr)
            continue
        _libc_mount(libc, f"/proc/self/fd/{fd}", path, MS_BIND)


def apply_plan(plan: dict[str, Any]) -> None:
    """Perform the plan's mounts, keep its image visible, and enter its working directory (in the current mount
    namespace)."""
    mounts = plan.get("mounts") or []
    fds: list[int] = []
    image: list[tuple[str, int]] = []
    try:
        for mount in mounts:  # resolve every source before anything is mounted over its path
            try:
                fds.append(os.open(mount["source"], os.O_PATH | os.O_CLOEXEC))
            except OSError as exc:
                raise MountError(f"volume source {mount['source']}: {exc.strerror}") from exc
        for path in plan.get("image") or []:
            if os.path.isdir(path):
                image.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        for mount, fd in zip(mounts, fds, strict=True):
            target = mount["target"]
            _mount_point(target, stat.S_ISDIR(os.fstat(fd).st_mode))
            _libc_mount(libc, f"/proc/self/fd/{fd}", target, MS_BIND)
            if mount.get("readOnly"):
                _libc_mount(libc, None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)
        _restore_image(libc, image)
    finally:
        for fd in fds + [fd for _, fd in image]:
            os.close(fd)
    working_dir = plan.get("workingDir") or "/"
    os.makedirs(working_dir, exist_ok=True)
    os.chdir(working_dir)


def main(argv: list[str]) -> int:
    """``PLAN -- COMMAND...``: apply the plan, then exec the command (returns only on failure)."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: mountns.py PLAN.json -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        with open(argv[0], encoding="utf-8") as handle:
            apply_plan(json.load(handle))
    except (MountError, OSError, ValueError) as exc:
        print(f"localkube: cannot set up the container's volumes: {exc}", file=sys.stderr, flush=True)
        return 1
    command = argv[2:]
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"localkube: exec {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
