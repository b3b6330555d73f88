"""A MoE model served end to end by `pypto-serving engine` with vLLM's expert-parallel flags (TP=2, EP=2,
alltoall, round_robin): streaming equals non-streaming equals `transformers`, and /metrics shows the experts' load."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.test_api import complete
from tests.support.models import hf_greedy, tiny_model_dir

EP_ARGS = ["--device", "cpu", "--tensor-parallel-size", "2", "--enable-expert-parallel", "--all2all-backend",
           "alltoall", "--expert-placement-strategy", "round_robin", "--max-model-len", "512", "--cpu-threads", "1"]


def test_ep_engine_streams_transformers_tokens_and_exports_expert_load(engine_factory) -> None:
    model_dir = tiny_model_dir("qwen2-moe")
    engine = engine_factory(model_dir, extra_args=EP_ARGS)
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = [17, 250, 3, 99, 640, 12, 7, 401]
    args = {"max_tokens": 16, "ignore_eos": True, "temperature": 0.0, "return_tokens_as_token_ids": True}
    choice = complete(client, model_dir.name, prompt, logprobs=0, **args).choices[0]
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in hf_greedy(model_dir, prompt, 16)]
    chunks = list(complete(client, model_dir.name, prompt, stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "pypto:moe_expert_tokens"]
    per_layer: dict[str, float] = {}
    for sample in family.samples:
        per_layer[sample.labels["layer"]] = per_layer.get(sample.labels["layer"], 0) + sample.value
    # two requests of 8 prompt tokens + 15 fed-back outputs each, top-2 routing, in both layers
    assert per_layer == {"0": 2 * 2 * (8 + 15), "1": 2 * 2 * (8 + 15)}
