"""The engine's control endpoints (POST /drain, DELETE /drain) need the operator's token; the endpoints routers
written for vLLM probe (/version, /get_load, /v1/models owned_by, the vllm: gauges) have the shapes they parse.

Real engine processes, except the pure checks of engine/control.py at the end."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from pypto_serving.engine.api_errors import APIError
from pypto_serving.engine.control import MAX_TOKEN_BYTES, ControlAuth, read_token
from tests.support.engines import ENGINE_BIN, TINY_ENGINE_ARGS, EngineProcess


def completion(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}, timeout=60)


def state(url: str) -> tuple[int, bool]:
    """(/ready status, /load draining)."""
    return httpx.get(f"{url}/ready", timeout=10).status_code, httpx.get(f"{url}/load", timeout=10).json()["draining"]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]  # the OpenAI envelope
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}


def test_drain_and_its_undo_need_the_token(engine_factory, tiny_qwen3_dir: Path) -> None:
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=list(TINY_ENGINE_ARGS))
    model, url, good = tiny_qwen3_dir.name, engine.url, engine.control_headers
    token = engine.control_token
    assert token
    refused = [
        ({}, 401, "missing_token"),
        ({"Authorization": ""}, 401, "missing_token"),
        ({"Authorization": "Bearer"}, 401, "missing_token"),
        ({"Authorization": f"Basic {token}"}, 401, "missing_token"),
        ({"Authorization": token}, 401, "missing_token"),  # no scheme
        ({"Authorization": "Bearer wrong"}, 403, "invalid_token"),
        ({"Authorization": f"Bearer {token[:-1]}"}, 403, "invalid_token"),  # a prefix is not the token
        ({"Authorization": f"Bearer {token}x"}, 403, "invalid_token"),
        ({"Authorization": "Bearer " + "a" * 6000}, 403, "invalid_token"),
        ({"Authorization": b"Bearer \xff\xfe"}, 403, "invalid_token"),  # not UTF-8: no 500
    ]
    for headers, status, code in refused:
        response = httpx.post(f"{url}/drain", headers=headers, timeout=10)
        assert_error(response, status, code)
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert state(url) == (200, False), headers  # nothing changed
    assert completion(url, model).status_code == 200

    drained = httpx.post(f"{url}/drain", headers={"Authorization": f"bearer {token}"}, timeout=10)  # scheme: any case
    assert drained.status_code == 200 and drained.json() == {"draining": True, "inflight": 0}
    assert state(url) == (503, True)
    assert_error(completion(url, model), 503, "draining")
    assert httpx.post(f"{url}/drain", headers=good, timeout=10).status_code == 200  # idempotent

    for headers, status, code in refused[:1] + refused[5:6]:  # the undo is guarded the same way
        assert_error(httpx.delete(f"{url}/drain", headers=headers, timeout=10), status, code)
        assert state(url) == (503, True)
    undone = httpx.delete(f"{url}/drain", headers=good, timeout=10)
    assert undone.status_code == 200 and undone.json() == {"draining": False, "inflight": 0}
    assert state(url) == (200, False)
    assert completion(url, model).status_code == 200
    assert httpx.delete(f"{url}/drain", headers=good, timeout=10).status_code == 200  # undoing twice is fine
    assert "drain undone" in engine.log_tail(200)


def test_the_token_file_is_read_on_every_request(engine_factory, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    engine: EngineProcess = engine_factory(tiny_qwen3_dir, extra_args=[
        *TINY_ENGINE_ARGS, "--control-token-file", str(token_file)])
    assert engine.control_token is None  # the test's own file
    assert httpx.post(f"{engine.url}/drain", headers={"Authorization": "Bearer first-token"},
                      timeout=10).status_code == 200
    token_file.write_text("second-token")  # the kubelet updates a mounted Secret in place
    assert_error(httpx.delete(f"{engine.url}/drain", headers={"Authorization": "Bearer first-token"}, timeout=10),
                 403, "invalid_token")
    assert httpx.delete(f"{engine.url}/drain", headers={"Authorization": "Bearer second-token"},
                        timeout=10).status_code == 200
    token_file.unlink()  # the Secret is gone: refuse everything rather than accept anything
    assert_error(httpx.post(f"{engine.url}/drain", headers={"Authorization": "Bearer second-token"}, timeout=10),
                 403, "control_disabled")
    assert state(engine.url) == (200, False)


@pytest.mark.parametrize("content", [None, b"", b" \n", b"x" * (MAX_TOKEN_BYTES + 1)])
def test_an_unusable_token_file_stops_the_engine_at_start(tmp_path: Path, tiny_qwen3_dir: Path,
                                                          content: bytes | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run([str(ENGINE_BIN), "engine", "--model", str(tiny_qwen3_dir), "--port", "9",
                             "--control-token-file", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"control token file .*(cannot read|empty|larger than)|cannot read the control token",
                     result.stderr), result.stderr


def test_detected_as_vllm_by_the_routers_probes(tiny_engine: EngineProcess, tiny_qwen3_dir: Path) -> None:
    """What smg (model_gateway/src/workflow/steps/local/detect_backend.rs, worker/monitor.rs) and vllm-router
    (src/routers/http/router.rs, power_of_two's load monitor) read, in the shapes they parse."""
    url = tiny_engine.url
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    first = models["data"][0]
    assert first["owned_by"] == "vllm"  # smg: owned_by "vllm" -> runtime vllm
    assert first["id"] == tiny_qwen3_dir.name and first["root"] == str(tiny_qwen3_dir) and first["max_model_len"] > 0
    version = httpx.get(f"{url}/version", timeout=10)
    assert version.status_code == 200 and isinstance(version.json()["version"], str) and version.json()["version"]
    load = httpx.get(f"{url}/get_load", timeout=10).json()  # vllm-router: data.get("load").as_i64()
    assert type(load["load"]) is int and load["load"] == 0 and load["running"] == 0
    metrics = httpx.get(f"{url}/metrics", timeout=10).text  # smg's load for a vLLM worker; kv usage is required
    for gauge in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert re.search(rf"^{re.escape(gauge)}\{{[^}}]*\}} [0-9.e+-]+$", metrics, re.M), gauge
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # smg classifies a worker answering it as local


# --- engine/control.py without a server -----------------------------------------------------------------------------

def test_control_without_a_token_file_is_disabled() -> None:
    with pytest.raises(APIError) as caught:
        ControlAuth(None).check("Bearer anything")
    assert caught.value.status == 403 and caught.value.code == "control_disabled"


def test_read_token_strips_whitespace_and_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(b"  abc\n")
    assert read_token(tmp_path / "t") == b"abc"
    with pytest.raises(ValueError, match="cannot read"):
        read_token(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot read"):
        read_token(tmp_path)  # a directory
    auth = ControlAuth(str(tmp_path / "t"))
    auth.check("Bearer abc")
    auth.check("BEARER   abc  ")
    for bad in ("Bearer ab", "Bearer abcd", "Bearer ABC"):
        with pytest.raises(APIError) as caught:
            auth.check(bad)
        assert caught.value.status == 403
