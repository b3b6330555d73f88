"""Gateway test fixtures: two real tiny-model engines shared by the gateway tests, and a gateway factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateway.harness import GatewayProcess, start_gateway
from tests.support.engines import EngineProcess, launch_engine

ENGINE_ARGS = ["--max-model-len", "4096", "--max-num-seqs", "16", "--cpu-threads", "1"]


@pytest.fixture(scope="session")
def shared_engines(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> Iterator[list[EngineProcess]]:
    """Two real engines (tiny Qwen3), started in parallel once for all gateway tests. Tests must not drain,
    kill or otherwise change them; destructive tests start their own."""
    log_dir = tmp_path_factory.mktemp("gateway-engines")
    engines = [launch_engine(tiny_qwen3_dir, extra_args=ENGINE_ARGS, log_dir=log_dir) for _ in range(2)]
    try:
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.stop(timeout=15)


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayProcess]]:
    """`gateway_factory(*args)` starts a gateway process; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def factory(*args: str, **kwargs: object) -> GatewayProcess:
        gw = start_gateway(*args, **kwargs)  # type: ignore[arg-type]
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        gw.stop()
