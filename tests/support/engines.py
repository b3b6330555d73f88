"""Shared test fixtures: real `pypto-serving engine` processes on loopback (owned by the engine server; see
docs/architecture.md, "Engine server").

`start_engine(model_dir)` launches `.venv/bin/pypto-serving engine` (HF_HUB_OFFLINE=1, output to a log file),
waits until `/ready` answers 200 and returns an `EngineProcess` (`.url`, `.proc`, `.log_tail()`, `.stop()`).
If the engine exits or misses the deadline, it fails with the tail of its log. The fixtures `engine_factory`
(function scope) and `module_engine_factory` (module scope) start engines and stop them all at teardown::

    def test_something(engine_factory, tiny_qwen3_dir):
        engine = engine_factory(tiny_qwen3_dir, extra_args=["--max-model-len", "256"])
        httpx.get(f"{engine.url}/load")

Each engine gets a control token of its own (`--control-token-file`, as the operator's pods do): a test drains it
with ``httpx.post(f"{engine.url}/drain", headers=engine.control_headers)``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.support.common import REPO_ROOT, free_port

ENGINE_BIN = REPO_ROOT / ".venv" / "bin" / "pypto-serving"
START_TIMEOUT_S = float(os.environ.get("PYPTO_ENGINE_START_TIMEOUT", "240"))


class EngineProcess:
    """One running `pypto-serving engine` subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path, args: list[str],
                 control_token: str | None = None) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.args = args
        self.control_token = control_token

    @property
    def control_headers(self) -> dict[str, str]:
        """The Authorization header its control endpoints (POST/DELETE /drain) accept."""
        return {"Authorization": f"Bearer {self.control_token}"} if self.control_token else {}

    def __repr__(self) -> str:
        return f"EngineProcess({self.url}, pid={self.proc.pid}, log={self.log_path})"

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the engine's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"<no log: {exc}>"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until /ready answers 200; fail with the log tail if the engine exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"engine {self} exited with {self.proc.returncode} before it was ready; log tail:\n"
                                   f"{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/ready", timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"/ready {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"engine {self} not ready after {timeout:.0f}s ({last}); log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the engine drains), then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def engine_command(model_dir: str | Path, host: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line `start_engine` runs."""
    return [str(ENGINE_BIN), "engine", "--model", str(model_dir), "--host", host, "--port", str(port), *extra_args]


def launch_engine(model_dir: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                  extra_args: Sequence[str] = (), log_dir: str | Path | None = None,
                  env: dict[str, str] | None = None) -> EngineProcess:
    """Start an engine without waiting for it (see `start_engine`)."""
    port = port or free_port(host)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pypto-engine-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"engine-{port}.log"
    token = None
    if "--control-token-file" not in extra_args:  # every test engine gets a token, as the operator's pods do
        token = secrets.token_hex(16)
        token_file = log_dir / f"engine-{port}.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        extra_args = [*extra_args, "--control-token-file", str(token_file)]
    args = engine_command(model_dir, host, port, extra_args)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    return EngineProcess(proc, f"http://{host}:{port}", log_path, args, token)


def start_engine(model_dir: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 extra_args: Sequence[str] = (), log_dir: str | Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = START_TIMEOUT_S) -> EngineProcess:
    """Launch `pypto-serving engine --model DIR ...` and wait until it is ready (stopped again if it is not)."""
    engine = launch_engine(model_dir, host=host, port=port, extra_args=extra_args, log_dir=log_dir, env=env)
    try:
        engine.wait_ready(timeout)
    except BaseException:
        engine.stop(timeout=5)
        raise
    return engine


class EngineLauncher:
    """Starts engines for a fixture and stops every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.engines: list[EngineProcess] = []

    def __call__(self, model_dir: str | Path, **kwargs: object) -> EngineProcess:
        kwargs.setdefault("log_dir", self.log_dir)
        wait = kwargs.pop("wait", True)
        engine = (start_engine if wait else launch_engine)(model_dir, **kwargs)  # type: ignore[arg-type]
        self.engines.append(engine)
        return engine

    def stop_all(self) -> None:
        for engine in self.engines:
            code = engine.stop(timeout=15)
            if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
                print(f"{engine} exited with {code}; log tail:\n{engine.log_tail(30)}", file=sys.stderr)


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[EngineLauncher]:
    """`engine_factory(model_dir, extra_args=[...], wait=True)` -> EngineProcess; all stopped after the test."""
    launcher = EngineLauncher(tmp_path / "engines")
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineLauncher]:
    """Like `engine_factory`, for engines shared by the tests of a module."""
    launcher = EngineLauncher(tmp_path_factory.mktemp("engines"))
    yield launcher
    launcher.stop_all()


TINY_ENGINE_ARGS = ("--max-model-len", "1024", "--max-num-seqs", "8")


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> Iterator[EngineProcess]:
    """One real engine on the tiny Qwen3 (max model len 1024) shared by the session's API tests. Tests must leave it
    serving (no drain, no kill) and idle when they end; destructive tests start their own with `engine_factory`."""
    launcher = EngineLauncher(tmp_path_factory.mktemp("tiny-engine"))
    try:
        yield launcher(tiny_qwen3_dir, extra_args=list(TINY_ENGINE_ARGS))
    finally:
        launcher.stop_all()
