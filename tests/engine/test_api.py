"""The engine's OpenAI API end to end: a real `pypto-serving engine` process on the tiny Qwen3, driven by the
official `openai` client (raw httpx only where the wire format itself is under test)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from pypto_serving.contract import LoadReport
from tests.support.common import wait_for
from tests.support.engines import EngineProcess

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def client(tiny_engine: EngineProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_engine.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(tiny_qwen3_dir: Path) -> str:
    return tiny_qwen3_dir.name


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_qwen3_dir)


VLLM_EXTRAS = ("ignore_eos", "top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens",
               "include_stop_str_in_output", "return_tokens_as_token_ids")


def complete(client: openai.OpenAI, model: str, prompt, **kwargs):
    """client.completions.create, with vLLM's extra sampling fields moved into extra_body."""
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in VLLM_EXTRAS}
    return client.completions.create(model=model, prompt=prompt, extra_body=extra or None, **kwargs)


def test_models_lists_the_served_name(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]


def test_completion_counts_tokens_and_stops_at_max_tokens(client, model, tokenizer):
    prompt = "The quick brown fox"
    result = complete(client, model, prompt, max_tokens=12, ignore_eos=True, **GREEDY)
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    again = complete(client, model, prompt, max_tokens=12, ignore_eos=True, **GREEDY)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_streaming_equals_non_streaming(client, model):
    prompt = "Once upon a time"
    full = complete(client, model, prompt, max_tokens=24, ignore_eos=True, **GREEDY).choices[0].text
    chunks = list(complete(client, model, prompt, max_tokens=24, ignore_eos=True, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_prompt_forms(client, model, tokenizer):
    text = "Hello, world! How are you"
    ids = tokenizer.encode(text)
    by_text = complete(client, model, text, max_tokens=6, ignore_eos=True, **GREEDY).choices[0].text
    assert complete(client, model, ids, max_tokens=6, ignore_eos=True, **GREEDY).choices[0].text == by_text
    many = complete(client, model, [text, "Water boils"], max_tokens=6, n=2, ignore_eos=True, **GREEDY)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    first = {c.index: c.text for c in many.choices}
    assert first[0] == first[1] == by_text  # choices 0..1 belong to prompt 0 (greedy: identical)
    assert many.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Water boils"))
    assert many.usage.completion_tokens == 4 * 6
    id_lists = complete(client, model, [ids, ids[:3]], max_tokens=6, ignore_eos=True, **GREEDY)
    assert id_lists.choices[0].text == by_text and len(id_lists.choices) == 2


def test_n_with_seed_gives_child_i_seed_plus_i(client, model):
    kwargs = {"max_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    fan = complete(client, model, "Tell me a story", n=3, seed=40, **kwargs)
    texts = {c.index: c.text for c in fan.choices}
    assert len(texts) == 3
    for i in range(3):
        alone = complete(client, model, "Tell me a story", seed=40 + i, **kwargs).choices[0].text
        assert texts[i] == alone
    assert len(set(texts.values())) > 1  # different seeds, different samples


def test_completion_logprobs(client, model):
    result = complete(client, model, "Numbers: 1 2 3", max_tokens=8, logprobs=3, ignore_eos=True, **GREEDY)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4 and token in top
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_strings_are_not_in_the_output(client, model):
    prompt = "Please write a short poem"
    full = complete(client, model, prompt, max_tokens=40, ignore_eos=True, **GREEDY).choices[0].text
    candidates = [full[i:i + 3] for i in range(4, len(full) - 3)]
    stop = next(c for c in candidates if c.strip() and "\ufffd" not in c)
    expected = full[:full.index(stop)]
    cut = complete(client, model, prompt, max_tokens=40, stop=[stop, "never-appears"], ignore_eos=True, **GREEDY)
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra.get("stop_reason") == stop
    chunks = [c.choices[0].text for c in complete(client, model, prompt, max_tokens=40, stop=stop, stream=True,
                                                  ignore_eos=True, **GREEDY)]
    assert "".join(chunks) == expected
    kept = complete(client, model, prompt, max_tokens=40, stop=stop, include_stop_str_in_output=True,
                    ignore_eos=True, **GREEDY)
    assert kept.choices[0].text == expected + stop


def test_stop_token_ids_end_the_text_without_their_text(client, model, tokenizer):
    result = complete(client, model, "Hello", max_tokens=10, stop_token_ids=list(range(len(tokenizer))), **GREEDY)
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.text == ""
    assert result.usage.completion_tokens == 1
    assert isinstance(choice.model_extra.get("stop_reason"), int)


def test_include_usage_and_done_on_the_wire(tiny_engine, model):
    body = {"model": model, "prompt": "Hi", "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{tiny_engine.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_uses_the_models_template(client, model, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    result = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert result.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 10
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == result.choices[0].message.content
    assert stream[-1].usage.prompt_tokens == result.usage.prompt_tokens and stream[-1].choices == []


def test_chat_n_and_logprobs(client, model):
    result = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=6, n=2, logprobs=True, top_logprobs=2, temperature=0.8,
                                            seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1]
    for choice in result.choices:
        content = choice.logprobs.content
        assert len(content) == 6
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes is not None for t in content)
    assert result.usage.completion_tokens == 12


def test_metrics_exposition(tiny_engine, client, model):
    complete(client, model, "metrics please", max_tokens=4, ignore_eos=True)
    text = httpx.get(f"{tiny_engine.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "pypto:pending_tokens",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:request_success"):
        assert name in families, name
    for line in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_requests_running{"):
        assert line in text

    def sample(family: str, suffix: str = "", **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    assert sample("vllm:request_success", "_total", finished_reason="length") >= 1
    assert sample("vllm:generation_tokens", "_total") >= 4
    assert sample("vllm:time_to_first_token_seconds", "_count") >= 1
    assert sample("vllm:prefix_cache_queries", "_total") >= sample("vllm:prefix_cache_hits", "_total")


def test_load_reports_the_batch_slots(tiny_engine):
    load = httpx.get(f"{tiny_engine.url}/load", timeout=10).json()
    assert load["max_num_seqs"] == 8  # TINY_ENGINE_ARGS: the gateway tells a free slot from a queue with it
    # exactly the contract's document (the DP+EP fields only on a DP rank), and it parses as one
    assert set(load) == set(LoadReport.model_fields) - {"dp_rank", "dp_size"}
    assert LoadReport.parse(load).max_num_seqs == 8


def test_prefix_cache_hits_are_reported(client, model, tokenizer):
    prefix = "Kubernetes schedules pods onto nodes; an operator watches custom resources. " * 3
    complete(client, model, prefix + "First", max_tokens=2, ignore_eos=True)
    second = complete(client, model, prefix + "Second", max_tokens=2, ignore_eos=True)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # at least one full block of the shared prefix


def test_echo_prepends_the_prompt(client, model):
    plain = complete(client, model, "Echo me", max_tokens=3, ignore_eos=True, **GREEDY).choices[0].text
    echoed = complete(client, model, "Echo me", max_tokens=3, echo=True, ignore_eos=True, **GREEDY).choices[0].text
    assert echoed == "Echo me" + plain


def test_concurrent_streams_each_get_their_own_tokens(client, model):
    prompts = [f"Request number {i} says" for i in range(6)]
    alone = [complete(client, model, p, max_tokens=10, ignore_eos=True, **GREEDY).choices[0].text for p in prompts]

    def streamed(prompt: str) -> str:
        chunks = complete(client, model, prompt, max_tokens=10, ignore_eos=True, stream=True, **GREEDY)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


def greedy_ids(client, model, prompt: str, n: int) -> list[int]:
    result = complete(client, model, prompt, max_tokens=n, logprobs=0, ignore_eos=True,
                      return_tokens_as_token_ids=True, **GREEDY)
    return [int(t.removeprefix("token_id:")) for t in result.choices[0].logprobs.tokens]


def test_sampling_fields_reach_the_sampler(client, model):
    prompt = "The weather is sunny"
    greedy = complete(client, model, prompt, max_tokens=12, ignore_eos=True, **GREEDY).choices[0].text
    for narrowing in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):  # each leaves only the argmax
        sampled = complete(client, model, prompt, max_tokens=12, ignore_eos=True, temperature=1.0, seed=1, **narrowing)
        assert sampled.choices[0].text == greedy, narrowing
    ids = greedy_ids(client, model, prompt, 8)
    stopper = next(t for t in ids[1:] if t != ids[0])
    early = complete(client, model, prompt, max_tokens=12, stop_token_ids=[stopper], **GREEDY)
    assert early.choices[0].finish_reason == "stop"
    assert early.choices[0].model_extra.get("stop_reason") == stopper
    assert early.usage.completion_tokens == ids.index(stopper) + 1
    held = complete(client, model, prompt, max_tokens=12, stop_token_ids=[stopper], min_tokens=8, **GREEDY)
    assert held.usage.completion_tokens >= 8  # min_tokens bans the stop token until 8 tokens exist
    for penalty in ({"presence_penalty": -2.0}, {"frequency_penalty": -2.0}, {"repetition_penalty": 0.1}):
        rewarded = complete(client, model, prompt, max_tokens=12, ignore_eos=True, **penalty, **GREEDY)
        assert rewarded.choices[0].text != greedy, penalty  # rewarding repeats changes the greedy output


def test_x_request_id_is_echoed_and_names_the_response(client, model):
    raw = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=3,
                                                      extra_headers={"x-request-id": "client-req-42"})
    assert raw.headers["x-request-id"] == "client-req-42"
    assert raw.parse().id == "cmpl-client-req-42"
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
            extra_headers={"x-request-id": "chat/7:{abc}"}) as response:
        assert response.headers["x-request-id"] == "chat/7:{abc}"
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks and {c["id"] for c in chunks} == {"chatcmpl-chat/7:{abc}"}


def test_a_request_without_a_usable_x_request_id_gets_one(tiny_engine, model):
    url = f"{tiny_engine.url}/v1/completions"
    body = {"model": model, "prompt": "Hi", "max_tokens": 2}
    ids = []
    for headers in ({}, {"x-request-id": "has spaces"}, {"x-request-id": "x" * 129}):
        response = httpx.post(url, json=body, headers=headers, timeout=60)
        generated = response.headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        assert response.json()["id"] == f"cmpl-{generated}"
        ids.append(generated)
    assert len(set(ids)) == 3
    rejected = httpx.post(url, json={**body, "max_tokens": 0}, headers={"x-request-id": "bad-input-1"}, timeout=60)
    assert rejected.status_code == 400 and rejected.headers["x-request-id"] == "bad-input-1"
    too_big = httpx.post(url, content=b"x" * (9 << 20), headers={"x-request-id": "too-big-1"}, timeout=60)
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "too-big-1"


def test_a_reused_x_request_id_does_not_mix_requests(client, model):
    def run(prompt: str) -> str:
        return complete(client, model, prompt, max_tokens=16, ignore_eos=True, extra_headers={"x-request-id": "same"},
                        **GREEDY).choices[0].text

    prompts = ["The quick brown fox", "Water boils at", "Once upon a time", "Hello, world!"]
    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, prompts)) == alone


def test_aborts_are_logged_under_the_x_request_id(tiny_engine, model):
    body = {"model": model, "prompt": "A long story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_engine.url}/v1/completions", json=body, timeout=60,
                      headers={"x-request-id": "gone-early-9"}) as response:
        assert response.headers["x-request-id"] == "gone-early-9"
        next(response.iter_lines())
    wait_for(lambda: "request gone-early-9: the stream ended early" in tiny_engine.log_tail(200), 30,
             "the abort to be logged under the client's request id")
    wait_for(lambda: httpx.get(f"{tiny_engine.url}/load", timeout=10).json()["running"] == 0, 30, "the abort")
