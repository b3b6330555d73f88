"""Loading, readiness, drain and shutdown of the engine server: real engine processes (signals, exit codes), plus
one in-process server whose real LLMEngine is built behind a gate so the loading phase can be observed."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from pypto_serving.engine.async_engine import AsyncEngine
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.server import ServerSettings, build_app
from tests.support.common import REPO_ROOT, free_port, wait_for
from tests.support.engines import TINY_ENGINE_ARGS, EngineProcess


def completion(url: str, model: str, **fields: object) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 4, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


HELD_N = 8  # choices per test stream


class SmallWindowConnection(http.client.HTTPConnection):
    """HTTP over a socket whose receive buffer is set before connecting, so the TCP window stays tiny."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


class StreamReader(threading.Thread):
    """Reads one streamed completion in the background; `events` are the SSE data payloads.

    The stream is 8 choices with 20 logprobs per token: seconds of engine work and ~7 MB of SSE for 1000 tokens,
    more than loopback TCP buffers take (and the socket's receive window is tiny). With `hold`, the reader stops
    after the first event until `resume` is set, so the server soon blocks sending and the request stays in flight
    for as long as the test wants, whatever the machine's speed.
    """

    def __init__(self, url: str, model: str, max_tokens: int, hold: bool = False) -> None:
        super().__init__(daemon=True)
        self.body = {"model": model, "prompt": "Tell me everything", "max_tokens": max_tokens, "ignore_eos": True,
                     "n": HELD_N, "logprobs": 20, "stream": True, "stream_options": {"include_usage": True}}
        self.url = url
        self.hold = hold
        self.resume = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        connection = SmallWindowConnection(host, int(port), timeout=120)
        try:
            connection.request("POST", "/v1/completions", body=json.dumps(self.body),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            self.status = response.status
            while raw := response.readline():
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if self.hold:
                        self.resume.wait(120)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def chunks(self) -> list[dict]:
        return [chunk for e in self.events if e != "[DONE]" and "choices" in (chunk := json.loads(e))]

    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for chunk in self.chunks() for c in chunk["choices"] if c["finish_reason"]]

    def usage(self) -> dict:
        return self.chunks()[-1]["usage"]


def assert_rejected_while_draining(engine_url: str, model: str) -> None:
    response = completion(engine_url, model)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "draining"
    ready = httpx.get(f"{engine_url}/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert httpx.get(f"{engine_url}/load", timeout=10).json()["draining"] is True
    assert httpx.get(f"{engine_url}/health", timeout=10).status_code == 200


@contextlib.contextmanager
def in_process_server(factory: Callable[[], LLMEngine], model: str) -> Iterator[tuple[str, AsyncEngine]]:
    """The engine app around a real LLMEngine built by `factory`, served by uvicorn on a thread of this process (so
    the test can reach the engine's workers); yields its URL once /health answers, and the AsyncEngine."""
    engine = AsyncEngine(factory)
    app = build_app(engine, ServerSettings(served_model_name="tiny", model=model))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 30, "/health")
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_loading_answers_health_but_not_ready(tiny_qwen3_dir: Path):
    gate = threading.Event()
    config = EngineConfig(model=str(tiny_qwen3_dir), max_model_len=256, max_num_seqs=4)

    def gated_engine() -> LLMEngine:
        gate.wait(60)
        return LLMEngine(config)

    with in_process_server(gated_engine, config.model) as (url, _):
        try:
            ready = httpx.get(f"{url}/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            assert httpx.get(f"{url}/load", timeout=5).json() == {"running": 0, "waiting": 0, "pending_tokens": 0,
                                                                 "kv_cache_usage": 0.0, "draining": False}
            early = completion(url, "tiny")
            assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
            assert "retry-after" in early.headers
            gate.set()
            wait_for(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, 60, "/ready after loading")
            assert completion(url, "tiny").json()["usage"]["completion_tokens"] >= 1
        finally:
            gate.set()  # never leave the loop thread waiting on the gate


def test_a_request_the_dead_engine_refuses_is_503_with_retry_after(tiny_qwen3_dir: Path):
    """A request admitted while the engine still looked healthy, then refused by LLMEngine.add_request (RuntimeError:
    a TP worker died meanwhile), is a 503 to retry elsewhere, never a 400 blaming the client."""
    config = EngineConfig(model=str(tiny_qwen3_dir), max_model_len=256, max_num_seqs=4, tensor_parallel_size=2)
    with in_process_server(lambda: LLMEngine(config), config.model) as (url, engine), ThreadPoolExecutor(2) as pool:
        wait_for(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, 120, "/ready")
        rank1 = engine.engine.executor.procs[1]
        os.kill(rank1.pid, signal.SIGSTOP)  # the next step hangs in its all-reduce: the loop thread is stuck in it
        try:
            first = pool.submit(completion, url, "tiny")
            wait_for(engine.engine.has_unfinished_requests, 30, "the first request to be in the hung step")
            second = pool.submit(completion, url, "tiny")  # admitted (the health snapshot predates the hang), queued
            wait_for(lambda: engine.num_requests() == 2, 30, "the second request to be queued")
        finally:
            os.kill(rank1.pid, signal.SIGKILL)  # the step sees the rank die: the engine is dead
        failed, refused = first.result(60), second.result(60)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "unavailable")
    assert error["message"].startswith("the engine cannot serve") and "rank 1" in error["message"]


def test_load_failure_exits_non_zero_with_the_reason(tmp_path: Path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    port = free_port()
    result = subprocess.run([str(REPO_ROOT / ".venv/bin/pypto-serving"), "engine", "--model", str(empty), "--port",
                             str(port)], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the model failed to load" in result.stderr
    assert "not a model directory" in result.stderr


def test_post_drain_finishes_in_flight_work_then_sigterm_exits_when_idle(engine_factory, tiny_qwen3_dir):
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=list(TINY_ENGINE_ARGS))
    model = tiny_qwen3_dir.name
    # rejected requests must not stay counted as in flight (SIGTERM below would then wait for the deadline)
    assert completion(engine.url, model, prompt="").status_code == 400
    assert completion(engine.url, model, max_tokens=10_000).status_code == 400
    assert completion(engine.url, "no-such-model").status_code == 404
    assert completion(engine.url, model).status_code == 200
    stream = StreamReader(engine.url, model, max_tokens=1000, hold=True)
    stream.start()
    wait_for(lambda: stream.events, 60, "the first streamed chunk")
    drained = httpx.post(f"{engine.url}/drain", headers=engine.control_headers, timeout=10)
    assert drained.status_code == 200 and drained.json() == {"draining": True, "inflight": 1}
    assert_rejected_while_draining(engine.url, model)
    stream.resume.set()
    stream.join(120)
    assert stream.error is None and stream.status == 200
    assert stream.events[-1] == "[DONE]"
    assert stream.finish_reasons() == ["length"] * HELD_N and stream.usage()["completion_tokens"] == 1000 * HELD_N
    assert engine.alive()  # /drain alone does not exit
    started = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(30) == 0
    assert time.monotonic() - started < 10


def test_sigterm_drains_in_flight_streams_before_exiting(engine_factory, tiny_qwen3_dir):
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=list(TINY_ENGINE_ARGS))
    model = tiny_qwen3_dir.name
    stream = StreamReader(engine.url, model, max_tokens=1000, hold=True)
    stream.start()
    wait_for(lambda: stream.events, 60, "the first streamed chunk")
    engine.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{engine.url}/ready", timeout=5).status_code == 503, 10, "/ready 503 on SIGTERM")
    assert_rejected_while_draining(engine.url, model)
    undo = httpx.delete(f"{engine.url}/drain", headers=engine.control_headers, timeout=10)
    assert undo.status_code == 409 and undo.json()["error"]["code"] == "shutting_down"  # a SIGTERM is not undone
    assert_rejected_while_draining(engine.url, model)
    # the engine finishes generating while the held stream still has most of it to send: that keeps the engine up
    wait_for(lambda: httpx.get(f"{engine.url}/load", timeout=5).json()["pending_tokens"] == 0, 60, "generation done")
    assert engine.alive() and stream.is_alive()
    stream.resume.set()
    stream.join(120)
    assert stream.error is None and stream.events[-1] == "[DONE]"
    assert stream.finish_reasons() == ["length"] * HELD_N and stream.usage()["completion_tokens"] == 1000 * HELD_N
    assert engine.proc.wait(30) == 0
    assert "draining" in engine.log_tail(200)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_a_drain_exits_at_once(engine_factory, tiny_qwen3_dir, second):
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=list(TINY_ENGINE_ARGS))  # drain timeout 120 s
    stream = StreamReader(engine.url, tiny_qwen3_dir.name, max_tokens=1000, hold=True)
    stream.start()
    wait_for(lambda: stream.events, 60, "the first streamed chunk")
    engine.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{engine.url}/ready", timeout=5).status_code == 503, 10, "/ready 503 on SIGTERM")
    assert engine.alive()  # draining: the held stream keeps it up
    started = time.monotonic()
    engine.proc.send_signal(second)
    code = engine.proc.wait(30)
    elapsed = time.monotonic() - started
    stream.resume.set()
    stream.join(30)
    assert not stream.is_alive()
    assert code == 0 and elapsed < 10, (code, elapsed, engine.log_tail(30))  # not the 120 s drain timeout
    log = engine.log_tail(200)
    assert f"{signal.Signals(second).name}: exiting now" in log
    assert "Traceback" not in log  # the engine is stopped, not torn down by the interpreter's exit


def test_drain_deadline_aborts_what_is_left(engine_factory, tiny_qwen3_dir):
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=[*TINY_ENGINE_ARGS, "--drain-timeout", "0"])
    stream = StreamReader(engine.url, tiny_qwen3_dir.name, max_tokens=1000)
    stream.start()
    wait_for(lambda: stream.events, 60, "the first streamed chunk")
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(30) == 0
    stream.join(30)
    assert not stream.is_alive()
    assert stream.finish_reasons() == ["abort"] * HELD_N
    assert stream.usage()["completion_tokens"] < 1000 * HELD_N


def test_dead_worker_makes_health_fail(engine_factory, tiny_qwen3_dir):
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=[*TINY_ENGINE_ARGS, "--tensor-parallel-size",
                                                                       "2"])
    children = [int(pid) for task in Path(f"/proc/{engine.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2
    assert httpx.get(f"{engine.url}/health", timeout=5).status_code == 200
    stream = StreamReader(engine.url, tiny_qwen3_dir.name, max_tokens=1000)
    stream.start()
    wait_for(lambda: stream.events, 60, "the first streamed chunk")
    subprocess.run(["kill", "-9", str(workers[-1])], check=True)
    stream.join(60)
    assert stream.status == 200 and stream.events[-1] == "[DONE]"  # the stream ends cleanly ...
    errors = [json.loads(e)["error"] for e in stream.events[:-1] if "error" in json.loads(e)]
    assert len(errors) == HELD_N and errors[0]["type"] == "internal_error"  # ... with an error event per choice
    assert stream.finish_reasons() == ["error"] * HELD_N
    wait_for(lambda: httpx.get(f"{engine.url}/health", timeout=5).status_code == 503, 30, "/health 503")
    assert httpx.get(f"{engine.url}/ready", timeout=5).status_code == 503
    response = completion(engine.url, tiny_qwen3_dir.name)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unhealthy"
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(60) == 0


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    assert not [t for t in threading.enumerate() if isinstance(t, StreamReader) and t.is_alive()]
