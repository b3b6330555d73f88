"""A real `pypto-serving engine --pipeline-parallel-size 2` process: the OpenAI API over two stages (streaming
equals non-streaming), client disconnects while micro-batches are in flight, pipeline metrics, a killed stage."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.common import wait_for
from tests.support.engines import TINY_ENGINE_ARGS, EngineProcess

PP_ARGS = [*TINY_ENGINE_ARGS, "--device", "cpu", "--pipeline-parallel-size", "2", "--cpu-threads", "1"]


@pytest.fixture(scope="module")
def engine(module_engine_factory, tiny_qwen3_dir: Path) -> EngineProcess:
    return module_engine_factory(tiny_qwen3_dir, extra_args=PP_ARGS)


def body(model: str, prompt: str, max_tokens: int, **fields: object) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            **fields}


def streamed_text(url: str, payload: dict) -> tuple[str, str | None]:
    text, reason = "", None
    with httpx.stream("POST", f"{url}/v1/completions", json={**payload, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_streaming_equals_non_streaming_with_concurrent_requests(engine: EngineProcess, tiny_qwen3_dir: Path) -> None:
    model = tiny_qwen3_dir.name
    prompts = [f"Request number {i} says" for i in range(8)]
    alone = [httpx.post(f"{engine.url}/v1/completions", json=body(model, p, 16), timeout=120).json()
             for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: streamed_text(engine.url, body(model, p, 16)), prompts))
    assert together == [(r["choices"][0]["text"], "length") for r in alone]
    got = metrics(engine.url)
    labels = (("model_name", model),)
    assert ("pypto:pp_inflight_micro_batches", labels) in got
    for stage in ("0", "1"):
        assert 0.0 <= got[("pypto:pp_stage_idle_ratio", (("model_name", model), ("stage", stage)))] < 1.0


def test_client_disconnects_in_flight_free_every_block(engine: EngineProcess, tiny_qwen3_dir: Path) -> None:
    model = tiny_qwen3_dir.name

    def disconnect(i: int) -> int:
        payload = body(model, f"Tell me a long story number {i}", 500, stream=True)
        with httpx.stream("POST", f"{engine.url}/v1/completions", json=payload, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    return 1  # leaves with its request running on the stages
        return 0

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(disconnect, range(500))) == 500
    load = wait_for(lambda: (lambda d: d if d["running"] == 0 and d["waiting"] == 0 else None)(
        httpx.get(f"{engine.url}/load", timeout=5).json()), 60, "the aborted requests to leave the engine")
    assert load["kv_cache_usage"] == 0.0 and load["pending_tokens"] == 0
    wait_for(lambda: metrics(engine.url)[("pypto:pp_inflight_micro_batches", (("model_name", model),))] == 0, 30,
             "no micro-batch in flight")
    text, reason = streamed_text(engine.url, body(model, "Still serving", 8))
    assert reason == "length" and text


def test_a_killed_stage_turns_the_engine_unhealthy_and_requests_get_an_error(
        engine_factory, tiny_qwen3_dir: Path) -> None:
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=PP_ARGS)
    model = tiny_qwen3_dir.name
    children = [int(pid) for task in Path(f"/proc/{engine.proc.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    stages = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(stages) == 2
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=body(model, "Go on", 1000, stream=True),
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        started = time.monotonic()
        os.kill(max(stages), signal.SIGKILL)  # the stage spawned last
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert time.monotonic() - started < 10  # the stream ended: no hang
    assert any("error" in e for e in events)
    assert [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]] == ["error"]
    wait_for(lambda: httpx.get(f"{engine.url}/health", timeout=5).status_code == 503, 10, "/health 503")
    response = httpx.post(f"{engine.url}/v1/completions", json=body(model, "Anyone?", 4), timeout=30)
    assert response.status_code == 503
