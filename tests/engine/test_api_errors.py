"""Bad input against a real engine: every case is a 4xx in the OpenAI envelope naming the parameter, nothing is a
500, nothing gets stuck, and a client that goes away mid-request has its request aborted and its blocks freed."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.common import wait_for
from tests.support.engines import EngineProcess


@pytest.fixture(scope="module")
def model(tiny_qwen3_dir: Path) -> str:
    return tiny_qwen3_dir.name


def post(engine: EngineProcess, path: str, body: object, **kwargs: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{engine.url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def idle_load(engine: EngineProcess) -> dict:
    return httpx.get(f"{engine.url}/load", timeout=10).json()


COMPLETION_CASES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"prompt": [5, 999999]}, "prompt"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": [7] * 1100, "max_tokens": 1}, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "min_p": 2}, "min_p"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "a lot"}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": ["x"] * 20, "n": 60}, "n"),
    ({"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), COMPLETION_CASES, ids=[json.dumps(c[0])[:40] for c in COMPLETION_CASES])
def test_bad_completion_fields(tiny_engine, model, fields, param):
    assert_error(post(tiny_engine, "/v1/completions", {"model": model, **fields}), 400, param)


CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi " * 1100}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "true"}, "logprobs"),
    ({"messages": [{"role": "user"}], "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize(("fields", "param"), CHAT_CASES, ids=[json.dumps(c[0])[:40] for c in CHAT_CASES])
def test_bad_chat_fields(tiny_engine, model, fields, param):
    assert_error(post(tiny_engine, "/v1/chat/completions", {"model": model, **fields}), 400, param)


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"a string"', b'{"prompt": "x", "temperature": NaN}'])
def test_malformed_bodies_are_400(tiny_engine, body):
    assert_error(post(tiny_engine, "/v1/completions", body), 400)


def test_unknown_model_is_404(tiny_engine):
    error = assert_error(post(tiny_engine, "/v1/completions", {"model": "gpt-17", "prompt": "x"}), 404, "model")
    assert "gpt-17" in error["message"]
    assert_error(post(tiny_engine, "/v1/chat/completions",
                      {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}), 404, "model")


def test_openai_client_sees_the_error_envelope(tiny_engine, model):
    client = openai.OpenAI(base_url=f"{tiny_engine.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="x", max_tokens=0)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_oversized_bodies_are_413_before_being_read(tiny_engine, model):
    big = json.dumps({"model": model, "prompt": "x" * 10_000_000}).encode()
    assert_error(post(tiny_engine, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(120):
            yield b"x" * 100_000

    response = httpx.post(f"{tiny_engine.url}/v1/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert_error(response, 413)


def test_unknown_route_and_method_use_the_envelope(tiny_engine):
    assert_error(httpx.get(f"{tiny_engine.url}/v1/nothing-here", timeout=10), 404)
    assert_error(httpx.get(f"{tiny_engine.url}/v1/completions", timeout=10), 405)


def test_engine_still_serves_after_bad_input(tiny_engine, model):
    assert httpx.get(f"{tiny_engine.url}/health", timeout=10).status_code == 200
    ok = post(tiny_engine, "/v1/completions", {"model": model, "prompt": "still here", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    load = idle_load(tiny_engine)
    assert (load["running"], load["waiting"], load["pending_tokens"]) == (0, 0, 0)


def aborted_count(engine: EngineProcess) -> float:
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:request_success":
            return sum(s.value for s in family.samples if s.labels.get("finished_reason") == "abort")
    return 0.0


def wait_idle(engine: EngineProcess, kv_idle: float) -> None:
    def idle() -> bool:
        load = idle_load(engine)
        done = (load["running"], load["waiting"], load["pending_tokens"]) == (0, 0, 0)
        return done and load["kv_cache_usage"] <= kv_idle + 1e-9

    wait_for(idle, 30, "the aborted request to leave the engine and free its blocks")


def test_disconnect_mid_stream_aborts_the_request(tiny_engine, model):
    kv_idle, aborted = idle_load(tiny_engine)["kv_cache_usage"], aborted_count(tiny_engine)
    body = {"model": model, "prompt": "A long story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_engine.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        busy = idle_load(tiny_engine)
        assert busy["running"] + busy["waiting"] == 1 and busy["pending_tokens"] > 0, busy
    wait_idle(tiny_engine, kv_idle)
    assert aborted_count(tiny_engine) == aborted + 1, (received, tiny_engine.log_tail(20))


def test_disconnect_of_a_non_streaming_request_aborts_it(tiny_engine, model):
    kv_idle, aborted = idle_load(tiny_engine)["kv_cache_usage"], aborted_count(tiny_engine)
    body = json.dumps({"model": model, "prompt": "Another long story", "max_tokens": 1000, "ignore_eos": True,
                       "n": 8})  # 8 x 1000 tokens: seconds of work, so the disconnect comes first on any machine
    host, port = tiny_engine.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_for(lambda: idle_load(tiny_engine)["running"] == 8, 30, "the request to run")
    wait_idle(tiny_engine, kv_idle)
    assert aborted_count(tiny_engine) == aborted + 8, tiny_engine.log_tail(20)


def test_huge_prompts_are_rejected_without_tokenizing_them(tiny_engine, model):
    huge = "The quick brown fox jumps over the lazy dog. " * 110_000  # ~5 MB, under the body cap
    started = time.monotonic()
    error = assert_error(post(tiny_engine, "/v1/completions", {"model": model, "prompt": huge}), 400, "prompt")
    assert "maximum context length" in error["message"]
    assert_error(post(tiny_engine, "/v1/chat/completions",
                      {"model": model, "messages": [{"role": "user", "content": huge}]}), 400, "messages")
    assert time.monotonic() - started < 10  # tokenizing 5 MB would take tens of seconds on this machine
