"""The gateway in front of real tiny-model engines: relaying, streaming, auth, disconnects, routing, failures.

Every engine here is a real `pypto-serving engine` process and every request goes over real loopback sockets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway.conftest import ENGINE_ARGS
from tests.gateway.harness import GatewayProcess
from tests.gateway.tap import Tap, http_bodies
from tests.support.common import wait_for
from tests.support.engines import EngineProcess

LONG = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}  # seconds of decoding on the tiny model


def endpoints(*engines: EngineProcess | str) -> str:
    return ",".join(e if isinstance(e, str) else e.url for e in engines)


def load(engine: EngineProcess) -> dict:
    return httpx.get(engine.url + "/load", timeout=5).json()


def generated_tokens(engine: EngineProcess) -> float:
    """The engine's vllm:generation_tokens counter."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(engine.url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:generation_tokens_total")


def complete(gw: GatewayProcess, prompt: str = "hello", max_tokens: int = 2, headers: dict | None = None,
             **extra: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, **extra},
                      headers=headers, timeout=60)


class Background:
    """Long streaming requests sent straight to an engine from threads (keeps it busy), cancelled at exit."""

    def __init__(self, url: str, count: int) -> None:
        self.stop = threading.Event()
        self.started = threading.Semaphore(0)
        self.threads = [threading.Thread(target=self._run, args=(url,), daemon=True) for _ in range(count)]

    def _run(self, url: str) -> None:
        body = {"prompt": "busy " * 8, "stream": True, **LONG}
        first = True
        while not self.stop.is_set():  # one long request after the other until told to stop
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
                for _ in resp.iter_raw():
                    if first:
                        first = False
                        self.started.release()
                    if self.stop.is_set():
                        return  # closing the stream makes the engine abort the request

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        for _ in self.threads:
            assert self.started.acquire(timeout=60), "background request did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_openai_client_through_the_gateway_with_an_api_key(shared_engines: list[EngineProcess], tmp_path: Path,
                                                           gateway_factory: Callable[..., GatewayProcess]) -> None:
    (tmp_path / "key").write_text("sk-gateway\n")
    gw = gateway_factory("--endpoints", endpoints(*shared_engines), "--api-key-file", str(tmp_path / "key"))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-gateway", max_retries=0)
    models = client.models.list()
    assert len(models.data) == 1
    model = models.data[0].id
    done = client.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True, temperature=0))
    assert chunks and any(c.choices and c.choices[0].finish_reason for c in chunks)
    raw = client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=1)
    assert raw.headers["x-pypto-replica"] in {e.url for e in shared_engines}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):  # the engine's own 4xx passes through unchanged
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_streaming_is_byte_identical_and_unbuffered(shared_engines: list[EngineProcess],
                                                    gateway_factory: Callable[..., GatewayProcess]) -> None:
    engine = shared_engines[0]
    host, port = engine.url.removeprefix("http://").split(":")
    with Tap(host, int(port)) as tap:
        gw = gateway_factory("--endpoints", tap.url)
        body = {"prompt": "stream me", "stream": True, "stream_options": {"include_usage": True}, **LONG,
                "max_tokens": 400}
        client_bytes = bytearray()
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200 and resp.headers["x-pypto-replica"] == tap.url
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = resp.iter_raw()
            client_bytes.extend(next(chunks))
            # The first event reached the client while the engine is still generating: nothing is buffered.
            assert load(engine)["running"] >= 1
            for chunk in chunks:
                client_bytes.extend(chunk)
        sent = [b for raw in tap.responses for status, b in http_bodies(bytes(raw)) if b"data: [DONE]" in b]
    assert len(sent) == 1
    assert bytes(client_bytes) == sent[0]
    events = [e for e in bytes(client_bytes).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 400


def test_client_disconnect_cancels_the_upstream_request(shared_engines: list[EngineProcess],
                                                        gateway_factory: Callable[..., GatewayProcess]) -> None:
    engine = shared_engines[1]
    gw = gateway_factory("--endpoints", endpoints(engine))
    before = generated_tokens(engine)
    body = {"prompt": "cancel me", "stream": True, **LONG}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as resp:
        chunks = resp.iter_raw()  # keep a reference: a collected iterator closes the stream
        next(chunks)
        assert load(engine)["running"] == 1
    wait_for(lambda: load(engine)["running"] == 0 and load(engine)["pending_tokens"] == 0, 10, "upstream aborted")
    # the engine stopped generating well before max_tokens: the request was aborted, its KV blocks freed
    assert generated_tokens(engine) - before < LONG["max_tokens"] / 2
    # non-streaming: the client gives up while the engine is still working
    before = generated_tokens(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", json={"prompt": "slow", **LONG}, timeout=0.5)
    wait_for(lambda: load(engine)["running"] == 0, 10, "non-streaming upstream aborted")
    assert generated_tokens(engine) - before < LONG["max_tokens"] / 2
    # both disconnects are counted as 499; every request's time inside the gateway is recorded (request leg)
    wait_for(lambda: gw.metric("pypto_gateway_requests_total", replica=endpoints(engine), code="499") == 2, 10,
             "two client disconnects counted")
    assert gw.metric("pypto_gateway_overhead_seconds_count", leg="request") == 2
    assert gw.metric("pypto_gateway_overhead_seconds_count", leg="response") == 1  # the stream's first piece


def test_routing_follows_load(shared_engines: list[EngineProcess],
                              gateway_factory: Callable[..., GatewayProcess]) -> None:
    busy, idle = shared_engines
    gw = gateway_factory("--endpoints", endpoints(*shared_engines))
    with Background(busy.url, 3):
        wait_for(lambda: gw.replicas()[busy.url]["load"]["pending_tokens"] > 1000, 10, "the gateway sees the load")
        served = Counter(complete(gw, max_tokens=4).headers["x-pypto-replica"] for _ in range(12))
    assert served[idle.url] >= 11, served  # least-pending-tokens: the busy replica gets (almost) none
    assert {r["load_source"] for r in gw.replicas().values()} == {"watch"}  # the engines push their load
    # round-robin, chosen per request by header, ignores load
    rr = Counter(complete(gw, headers={"x-pypto-routing": "round-robin"}).headers["x-pypto-replica"]
                 for _ in range(6))
    assert rr[busy.url] == 3 and rr[idle.url] == 3


def test_routing_avoids_a_busy_engine_while_other_processes_saturate_the_cpu(
        shared_engines: list[EngineProcess], gateway_factory: Callable[..., GatewayProcess]) -> None:
    busy, idle = shared_engines
    gw = gateway_factory("--endpoints", endpoints(*shared_engines))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        with Background(busy.url, 3):  # long streams the gateway did not send
            wait_for(lambda: gw.replicas()[busy.url]["load"]["pending_tokens"] > 1000, 30, "the gateway sees the load")
            served = Counter(complete(gw, max_tokens=4).headers["x-pypto-replica"] for _ in range(12))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert served[idle.url] >= 10, served


def test_saturated_replicas_get_429_with_retry_after(shared_engines: list[EngineProcess],
                                                      gateway_factory: Callable[..., GatewayProcess]) -> None:
    engine = shared_engines[0]
    gw = gateway_factory("--endpoints", endpoints(engine), "--saturation-tokens", "1000", "--retry-after", "3")
    assert complete(gw).status_code == 200
    with Background(engine.url, 1):
        wait_for(lambda: gw.replicas()[engine.url]["load"]["pending_tokens"] >= 1000, 10, "saturation seen")
        resp = complete(gw)
        assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
        assert resp.json()["error"]["code"] == "saturated"
    wait_for(lambda: complete(gw).status_code == 200, 10, "accepting again once the load is gone")


def test_prefix_aware_keeps_prefixes_together_and_spreads_distinct_ones(
        shared_engines: list[EngineProcess], gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--endpoints", endpoints(*shared_engines), "--policy", "prefix-aware")
    homes: dict[int, set[str]] = {}
    for group in range(12):
        prefix = f"document {group}: " + f"shared context {group} " * 60
        for question in range(3):
            resp = complete(gw, prompt=prefix + f" question {question}?", max_tokens=1)
            assert resp.status_code == 200
            homes.setdefault(group, set()).add(resp.headers["x-pypto-replica"])
    assert all(len(h) == 1 for h in homes.values()), homes  # one replica per shared prefix
    assert {next(iter(h)) for h in homes.values()} == {e.url for e in shared_engines}  # distinct ones spread
    # the same prefixes from a second, independent gateway land on the same replicas (no shared state)
    other = gateway_factory("--endpoints", endpoints(*reversed(shared_engines)), "--policy", "prefix-aware")
    for group in (0, 5, 11):
        prefix = f"document {group}: " + f"shared context {group} " * 60
        assert complete(other, prompt=prefix + " again", max_tokens=1).headers["x-pypto-replica"] in homes[group]


def test_draining_replica_gets_no_new_requests_and_503s_are_retried(
        shared_engines: list[EngineProcess], tiny_qwen3_dir: Path, engine_factory,
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    keep = shared_engines[0]
    victim = engine_factory(tiny_qwen3_dir, extra_args=ENGINE_ARGS)
    fast = gateway_factory("--endpoints", endpoints(keep, victim), "--policy", "round-robin")
    blind = gateway_factory("--endpoints", endpoints(keep, victim), "--policy", "round-robin", "--no-load-watch",
                            "--poll-interval", "600")  # polls once at start: learns of the drain only by a 503
    assert {complete(fast).headers["x-pypto-replica"] for _ in range(4)} == {keep.url, victim.url}
    httpx.post(victim.url + "/drain", headers=victim.control_headers, timeout=10).raise_for_status()
    wait_for(lambda: fast.replicas()[victim.url]["state"] == "draining", 5, "drain pushed by the engine")
    assert {complete(fast).headers["x-pypto-replica"] for _ in range(6)} == {keep.url}
    answers = [complete(blind) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.headers["x-pypto-replica"] for r in answers} == {keep.url}
    assert blind.metric("pypto_gateway_retries_total", reason="unavailable") == 1  # one 503, then avoided
    assert blind.replicas()[victim.url]["state"] == "draining"


def test_killed_replica_requests_succeed_elsewhere_and_the_breaker_ejects_it(
        shared_engines: list[EngineProcess], tiny_qwen3_dir: Path, engine_factory,
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    keep = shared_engines[1]
    victim = engine_factory(tiny_qwen3_dir, extra_args=ENGINE_ARGS)
    gw = gateway_factory("--endpoints", endpoints(keep, victim), "--policy", "round-robin",
                         "--no-load-watch", "--poll-interval", "600", "--breaker-failures", "3", "--breaker-backoff",
                         "60")  # only requests count failures
    assert {complete(gw).headers["x-pypto-replica"] for _ in range(4)} == {keep.url, victim.url}
    victim.proc.kill()
    victim.proc.wait(10)
    answers = [complete(gw) for _ in range(10)]
    assert [r.status_code for r in answers] == [200] * 10
    assert {r.headers["x-pypto-replica"] for r in answers} == {keep.url}
    assert gw.metric("pypto_gateway_retries_total", reason="connect") == 3  # until the breaker ejected it
    assert gw.replicas()[victim.url]["state"] == "ejected"
    assert gw.metric("pypto_gateway_ejections_total", replica=victim.url) == 1


def test_upstream_idle_timeout_is_a_504_and_never_re_run(shared_engines: list[EngineProcess],
                                                         gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--endpoints", endpoints(*shared_engines), "--idle-timeout", "0.5")
    # non-streaming: the engine answers only after ~seconds of decoding, silence the gateway does not wait out
    resp = httpx.post(gw.url + "/v1/completions", json={"prompt": "silent", **LONG}, timeout=30)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    assert gw.metric("pypto_gateway_retries_total") == 0  # the engine had the request: never sent to another
    wait_for(lambda: all(load(e)["running"] == 0 for e in shared_engines), 10, "the abandoned request aborted")
    # a stream that keeps producing tokens is never idle, however long it runs
    body = {"prompt": "chatty", "stream": True, **LONG, "max_tokens": 1500}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as stream:
        assert stream.status_code == 200 and b"data: [DONE]" in stream.read()


def test_request_id_is_made_once_and_kept_across_a_retry(
        shared_engines: list[EngineProcess], tiny_qwen3_dir: Path, engine_factory,
        gateway_factory: Callable[..., GatewayProcess]) -> None:
    keep = shared_engines[0]
    victim = engine_factory(tiny_qwen3_dir, extra_args=ENGINE_ARGS)
    host, port = victim.url.removeprefix("http://").split(":")
    with Tap(host, int(port)) as tap:
        gw = gateway_factory("--endpoints", endpoints(keep, tap.url), "--policy", "round-robin", "--no-load-watch",
                             "--poll-interval", "600")  # learns of the drain only from the victim's 503
        wait_for(lambda: gw.replicas()[tap.url]["state"] == "ready", 10, "the tapped replica polled once")
        httpx.post(victim.url + "/drain", headers=victim.control_headers, timeout=10).raise_for_status()
        answers = [complete(gw) for _ in range(2)]  # round-robin: one of them is sent to the victim first
        assert [r.status_code for r in answers] == [200, 200]
        assert gw.metric("pypto_gateway_retries_total", reason="unavailable") == 1
        ids = [r.headers["x-request-id"] for r in answers]
        assert len(set(ids)) == 2 and all(ids)
        refused = [bytes(raw) for raw in tap.responses if b" 503 " in bytes(raw)]
    # the victim's 503 echoed the id of the request that was then served by the other replica
    assert len(refused) == 1
    assert any(f"x-request-id: {rid}".encode() in refused[0].lower() for rid in ids)
    # a client's own id is kept as it is, also on answers the gateway makes itself
    assert complete(gw, headers={"x-request-id": "client-id-7"}).headers["x-request-id"] == "client-id-7"
    empty = gateway_factory("--endpoints", "http://127.0.0.1:9", "--breaker-failures", "1", ready=False)
    resp = complete(empty, headers={"x-request-id": "client-id-8"})
    assert resp.status_code >= 500 and resp.headers["x-request-id"] == "client-id-8"
