"""GET /openapi.json on the gateway: the engines' OpenAI routes (fetched from a ready replica) plus the gateway's
own endpoints, without the engine-only ones; 503 while no replica is ready."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from tests.gateway.harness import GatewayProcess
from tests.support.common import free_port
from tests.support.engines import EngineProcess


def test_gateway_openapi_document(shared_engines: list[EngineProcess], tmp_path: Path,
                                  gateway_factory: Callable[..., GatewayProcess]) -> None:
    (tmp_path / "key").write_text("sk-doc\n")
    gw = gateway_factory("--endpoints", shared_engines[0].url, "--api-key-file", str(tmp_path / "key"))
    document = httpx.get(f"{gw.url}/openapi.json", timeout=30).json()  # open, like the probes
    engine = httpx.get(f"{shared_engines[0].url}/openapi.json", timeout=30).json()
    assert document["info"]["title"] == "pypto-serving gateway"
    assert set(document["paths"]) == {p for p in engine["paths"] if p.startswith("/v1/")} | {
        "/health", "/ready", "/replicas", "/metrics"}
    assert "/drain" not in document["paths"] and "/load" not in document["paths"]
    completions = document["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"] == engine["paths"]["/v1/completions"]["post"]["requestBody"]
    assert completions["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_gateway_openapi_needs_a_ready_replica(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--endpoints", f"http://127.0.0.1:{free_port()}", ready=False)
    response = httpx.get(f"{gw.url}/openapi.json", timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_replicas"
