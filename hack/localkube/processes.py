"""Starting and stopping background processes so that none of them ever leaks.

Every process the cluster starts (control plane, node agent, pod containers) carries the environment variable
``LOCALKUBE_DIR=<cluster dir>``; ``stop_marked`` finds them through /proc even when they were started by a
process that has died, and verifies the marker before signalling, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

MARKER = "LOCALKUBE_DIR"

# Variables never passed to cluster processes: a proxy would send loopback traffic (webhook calls, probes) astray.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


def with_parent_death_signal(args: Sequence[str]) -> list[str]:
    """Prefix ``args`` so the process gets SIGKILL when the *thread* that started it exits (util-linux setpriv)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *args]


def clean_environment(cluster_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The host environment without proxies, plus the cluster marker and ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.0/8,localhost"
    env[MARKER] = str(cluster_dir)
    env.update(extra or {})
    return env


def spawn(args: Sequence[str], *, log_path: Path, env: dict[str, str], cwd: Path | str | None = None,
          die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session (pgid = pid) with stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = with_parent_death_signal(args) if die_with_parent else list(args)
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, close_fds=True)


def process_marker(pid: int) -> str | None:
    """The ``LOCALKUBE_DIR`` value in a process's environment, or None."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARKER}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def marked_pids(cluster_dir: Path) -> list[int]:
    """Pids of live processes that carry this cluster's marker (never our own)."""
    wanted = str(cluster_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and process_marker(int(entry.name)) == wanted:
            pids.append(int(entry.name))
    return pids


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each pid and its process group, ignoring ones that are gone."""
    for pid in pids:
        for send in (lambda p=pid: os.killpg(p, sig), lambda p=pid: os.kill(p, sig)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send()


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the pids exit (reaping our own children); return the ones still alive after ``timeout``."""
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining:
        for pid in remaining:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        remaining = [pid for pid in remaining if is_alive(pid)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return remaining


def terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM the pids (and their groups), SIGKILL whatever is left after ``grace`` seconds."""
    if not pids:
        return
    signal_pids(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    if left:
        signal_pids(left, signal.SIGKILL)
        wait_gone(left, 5)


def stop_marked(cluster_dir: Path, grace: float = 5.0) -> int:
    """Stop every process carrying this cluster's marker; returns how many there were."""
    pids = marked_pids(cluster_dir)
    terminate(pids, grace)
    leftovers = marked_pids(cluster_dir)
    if leftovers:
        signal_pids(leftovers, signal.SIGKILL)
        wait_gone(leftovers, 5)
    return len(pids)
