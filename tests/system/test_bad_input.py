"""Bad input against a real engine and the real gateway in front of it: schema fuzzing (no 5xx, no hang),
oversized bodies, slow clients, and many aborted streams (every KV block freed, memory flat).

The sizes are lean for `make test`; `make chaos` runs the same tests bigger (PYPTO_FUZZ_EXAMPLES,
PYPTO_ABORTED_STREAMS) and records the measurements (PYPTO_BADINPUT_JSON) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.gateway.harness import GatewayProcess, start_gateway
from tests.support.common import wait_for
from tests.support.engines import EngineLauncher, EngineProcess

FUZZ_EXAMPLES = int(os.environ.get("PYPTO_FUZZ_EXAMPLES", "12"))
ABORTED_STREAMS = int(os.environ.get("PYPTO_ABORTED_STREAMS", "300"))
RESULTS_FILE = os.environ.get("PYPTO_BADINPUT_JSON")
CALL_TIMEOUT_S = 60.0  # a fuzzed call that takes longer is a hang
# Operations that change the server's state on purpose: fuzzing them would only test the drain.
NOT_FUZZED = {"/drain"}


def record(key: str, value: Any) -> None:
    """Add a measurement to the JSON file of `make chaos` (no-op in `make test`)."""
    if not RESULTS_FILE:
        return
    path = Path(RESULTS_FILE)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    data["load_average"] = round(os.getloadavg()[0], 2)  # at the last measurement
    data["command"] = (f"PYPTO_FUZZ_EXAMPLES={FUZZ_EXAMPLES} PYPTO_ABORTED_STREAMS={ABORTED_STREAMS} "
                       ".venv/bin/python -m pytest tests/system/test_bad_input.py (make chaos)")
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineLauncher]:
    launch = EngineLauncher(tmp_path_factory.mktemp("bad-input-engines"))
    yield launch
    launch.stop_all()


@pytest.fixture(scope="module")
def engine(launcher: EngineLauncher, tiny_qwen3_dir: Path) -> EngineProcess:
    """A real engine with a short context (32 tokens) so that any fuzzed request is cheap, with room for 1024
    choices per call."""
    return launcher(tiny_qwen3_dir, extra_args=["--max-model-len", "32", "--max-num-seqs", "64",
                                                "--served-model-name", "tiny"])


@pytest.fixture(scope="module")
def stream_engine(launcher: EngineLauncher, tiny_qwen3_dir: Path) -> EngineProcess:
    """A real engine with room for long streams (aborted midway)."""
    return launcher(tiny_qwen3_dir, extra_args=["--max-model-len", "1024", "--max-num-seqs", "32",
                                                "--served-model-name", "tiny"])


def _gateway(target: EngineProcess) -> Iterator[GatewayProcess]:
    gateway = start_gateway("--endpoints", target.url)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def gateway(engine: EngineProcess) -> Iterator[GatewayProcess]:
    yield from _gateway(engine)


@pytest.fixture(scope="module")
def stream_gateway(stream_engine: EngineProcess) -> Iterator[GatewayProcess]:
    yield from _gateway(stream_engine)


def openapi_without_state_changes(engine: EngineProcess) -> dict[str, Any]:
    """The engine's OpenAPI document (FastAPI), minus the operations that change its state on purpose."""
    document = httpx.get(f"{engine.url}/openapi.json", timeout=10).json()
    document["paths"] = {p: ops for p, ops in document["paths"].items() if p not in NOT_FUZZED}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(document["paths"])
    return document


@pytest.fixture(scope="module")
def engine_schema(engine: EngineProcess) -> Any:
    return schemathesis.openapi.from_dict(openapi_without_state_changes(engine))


@pytest.fixture(scope="module")
def gateway_schema(gateway: GatewayProcess) -> Any:
    """The gateway's own OpenAPI document (its /v1 routes are the engines', plus its endpoints)."""
    document = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/replicas"} <= set(document["paths"])
    return schemathesis.openapi.from_dict(document)


FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
FUZZ_COUNTS: dict[str, dict[str, int]] = {"engine": {}, "gateway": {}}


def call_checked(case: Any, base_url: str, counts: dict[str, int]) -> None:
    """One generated request: it must answer (no hang) and never with a 5xx."""
    started = time.monotonic()
    response = case.call(base_url=base_url, timeout=CALL_TIMEOUT_S)
    took = time.monotonic() - started
    counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
    case.validate_response(response, checks=[not_a_server_error])
    assert took < CALL_TIMEOUT_S


def fuzz(schema: Any, base_url: str, counts: dict[str, int]) -> int:
    """Valid (positive) and invalid (negative) generated requests for every operation of ``schema``; returns
    how many operations were fuzzed. (schemathesis's pytest plugin does not support pytest 9 yet, so the
    hypothesis tests are built here from each operation's strategies.)"""
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                call_checked(case, base_url, counts)

            try:
                run()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise  # an operation without parameters or body has no invalid inputs, only valid ones
        operations += 1
    return operations


def test_engine_schema_fuzz_no_5xx_no_hang(engine_schema: Any, engine: EngineProcess) -> None:
    assert fuzz(engine_schema, engine.url, FUZZ_COUNTS["engine"]) >= 7
    assert sum(FUZZ_COUNTS["engine"].values()) > 0


def test_gateway_schema_fuzz_no_5xx_no_hang(gateway_schema: Any, gateway: GatewayProcess) -> None:
    assert fuzz(gateway_schema, gateway.url, FUZZ_COUNTS["gateway"]) >= 7
    assert sum(FUZZ_COUNTS["gateway"].values()) > 0


def load(engine: EngineProcess) -> dict[str, Any]:
    return httpx.get(f"{engine.url}/load", timeout=5).json()


def kv_usage_gauge(engine: EngineProcess) -> float:
    """`vllm:kv_cache_usage_perc` from /metrics."""
    for line in httpx.get(f"{engine.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:kv_cache_usage_perc in /metrics")


def wait_idle(engine: EngineProcess, kv_idle: float, timeout: float = 60) -> None:
    """The engine has no request left and its KV gauge is back at its idle value."""
    def idle() -> bool:
        state = load(engine)
        return state["running"] == 0 and state["waiting"] == 0 and kv_usage_gauge(engine) <= kv_idle + 1e-9
    wait_for(idle, timeout, f"the engine to be idle with KV usage {kv_idle} (now {load(engine)})")


def test_fuzzing_left_the_engine_idle_and_healthy(engine: EngineProcess, gateway: GatewayProcess) -> None:
    wait_idle(engine, 0.0)
    assert httpx.get(f"{engine.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200
    record("fuzz", {"examples_per_operation": FUZZ_EXAMPLES, "status_counts": FUZZ_COUNTS})


@pytest.mark.parametrize("target", ["engine", "gateway"])
def test_oversized_bodies_are_413_without_reading_them(target: str, engine: EngineProcess,
                                                       gateway: GatewayProcess) -> None:
    url = (engine.url if target == "engine" else gateway.url) + "/v1/completions"
    huge = b'{"model": "tiny", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    response = httpx.post(url, content=huge, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["message"]  # the OpenAI error envelope

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold for a chunked body too
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    response = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 413, response.text[:300]
    assert time.monotonic() - started < 20
    # A prompt within the body limit but far beyond the model's context is a 400, never a 5xx.
    response = httpx.post(url, json={"model": "tiny", "prompt": "word " * 200_000, "max_tokens": 4}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert httpx.get((engine.url if target == "engine" else gateway.url) + "/health", timeout=5).status_code == 200


async def _slow_clients(host: str, port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open ``count`` connections that send half a request and then stall."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"model\": \"tiny\", \"prompt\": \"")
        await writer.drain()
        writers.append(writer)
    return writers


@pytest.mark.parametrize("target", ["engine", "gateway"])
def test_slow_clients_do_not_block_others(target: str, stream_engine: EngineProcess,
                                          stream_gateway: GatewayProcess) -> None:
    base = stream_engine.url if target == "engine" else stream_gateway.url
    host, port = base.removeprefix("http://").split(":")

    async def scenario() -> tuple[float, int]:
        writers = await _slow_clients(host, int(port), 100)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                started = time.monotonic()
                responses = await asyncio.gather(*[
                    client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
                    for _ in range(8)])
                return time.monotonic() - started, sum(r.status_code == 200 for r in responses)
        finally:
            for writer in writers:
                writer.close()

    took, ok = asyncio.run(scenario())
    assert ok == 8 and took < 20, f"{ok}/8 served in {took:.1f}s with 100 stalled clients"
    record(f"slow_clients_{target}", {"stalled_connections": 100, "requests_ok": ok, "seconds": round(took, 2)})


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def _abort_streams(base: str, count: int, concurrency: int = 32) -> int:
    """Start ``count`` long streams, read their first event, then drop the connection. Returns how many
    delivered a first event before being dropped."""
    started = 0
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": "tiny", "prompt": "tell me a long story " * 8, "max_tokens": 600, "stream": True,
            "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal started
        async with semaphore, client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    started += 1
                    break  # leaving the block closes the connection mid-stream

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*[one(client) for _ in range(count)])
    return started


def test_aborted_streams_free_every_kv_block_and_memory_stays_flat(stream_engine: EngineProcess,
                                                                    stream_gateway: GatewayProcess) -> None:
    kv_idle = kv_usage_gauge(stream_engine)
    # Warm up (allocator pools, connection pools, lazy imports, the cpu matmuls' capped kernel caches), then measure
    # the steady state.
    assert asyncio.run(_abort_streams(stream_gateway.url, 64)) == 64
    wait_idle(stream_engine, kv_idle)
    rss_engine, rss_gateway = _rss_mb(stream_engine.proc.pid), _rss_mb(stream_gateway.proc.pid)
    started = time.monotonic()
    half = ABORTED_STREAMS // 2
    delivered = asyncio.run(_abort_streams(stream_gateway.url, half))  # through the gateway
    delivered += asyncio.run(_abort_streams(stream_engine.url, ABORTED_STREAMS - half))  # and directly
    took = time.monotonic() - started
    assert delivered == ABORTED_STREAMS
    wait_idle(stream_engine, kv_idle)
    growth_engine = _rss_mb(stream_engine.proc.pid) - rss_engine
    growth_gateway = _rss_mb(stream_gateway.proc.pid) - rss_gateway
    # Flat: a leak of even one KB per aborted stream would show up as several MB here.
    assert growth_engine < 40 and growth_gateway < 20, (growth_engine, growth_gateway)
    aborted = 0.0
    for line in httpx.get(f"{stream_engine.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:request_success_total") and 'finished_reason="abort"' in line:
            aborted += float(line.rsplit(" ", 1)[1])
    assert aborted >= ABORTED_STREAMS
    record("aborted_streams", {"count": ABORTED_STREAMS, "seconds": round(took, 1), "kv_idle": kv_idle,
                               "kv_after": kv_usage_gauge(stream_engine), "engine_rss_mb_before": round(rss_engine, 1),
                               "engine_rss_growth_mb": round(growth_engine, 1),
                               "gateway_rss_mb_before": round(rss_gateway, 1),
                               "gateway_rss_growth_mb": round(growth_gateway, 1), "aborted_counted": aborted})
