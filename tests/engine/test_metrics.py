"""The metrics module on its own: per-app registries, scrape-time snapshot gauges, request timers (the exposition of
a real engine is checked in test_api.py)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pypto_serving.engine.metrics import EngineMetrics


def samples(metrics: EngineMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_apps_have_separate_registries():
    load = {"running": 3, "waiting": 2, "pending_tokens": 700, "kv_cache_usage": 0.25}
    stats = {"prefix_cache_queries": 120, "prefix_cache_hits": 48, "num_preemptions": 1}
    a = EngineMetrics("a", lambda: (load, stats), lambda: False)
    b = EngineMetrics("b", lambda: ({}, {}), lambda: True)  # the global registry would refuse a second set
    a.timer().on_tokens(1)
    got_a, got_b = samples(a), samples(b)
    model_a = (("model_name", "a"),)
    assert got_a[("vllm:num_requests_running", model_a)] == 3
    assert got_a[("vllm:num_requests_waiting", model_a)] == 2
    assert got_a[("pypto:pending_tokens", model_a)] == 700
    assert got_a[("vllm:kv_cache_usage_perc", model_a)] == 0.25
    assert got_a[("vllm:prefix_cache_queries_total", model_a)] == 120
    assert got_a[("vllm:prefix_cache_hits_total", model_a)] == 48
    assert got_a[("pypto:draining", model_a)] == 0
    assert got_b[("pypto:draining", (("model_name", "b"),))] == 1
    assert got_a[("vllm:generation_tokens_total", model_a)] == 1
    assert got_b[("vllm:generation_tokens_total", (("model_name", "b"),))] == 0


def test_gauges_follow_the_latest_snapshot():
    snapshot = {"running": 1}
    metrics = EngineMetrics("m", lambda: (snapshot, {}), lambda: False)
    assert samples(metrics)[("vllm:num_requests_running", (("model_name", "m"),))] == 1
    snapshot = {"running": 5}
    assert samples(metrics)[("vllm:num_requests_running", (("model_name", "m"),))] == 5


def test_request_timer_feeds_latency_histograms():
    metrics = EngineMetrics("m", lambda: ({}, {}), lambda: False)
    timer = metrics.timer()
    for _ in range(4):
        timer.on_tokens(1)
    timer.on_tokens(0)  # an output without tokens (a prefill chunk) is not an inter-token gap
    timer.on_finish("length", prompt_tokens=9)
    got = samples(metrics)
    label = (("model_name", "m"),)
    assert got[("vllm:time_to_first_token_seconds_count", label)] == 1
    assert got[("vllm:inter_token_latency_seconds_count", label)] == 3
    assert got[("vllm:time_per_output_token_seconds_count", label)] == 1
    assert got[("vllm:e2e_request_latency_seconds_count", label)] == 1
    assert got[("vllm:prompt_tokens_total", label)] == 9
    assert got[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "m")))] == 1


def test_pipeline_gauges_come_from_the_stats_snapshot():
    stats = {"pp_inflight_micro_batches": 2, "pp_stage_idle_ratio": [0.125, 0.25]}
    got = samples(EngineMetrics("m", lambda: ({}, stats), lambda: False))
    assert got[("pypto:pp_inflight_micro_batches", (("model_name", "m"),))] == 2
    assert got[("pypto:pp_stage_idle_ratio", (("model_name", "m"), ("stage", "0")))] == 0.125
    assert got[("pypto:pp_stage_idle_ratio", (("model_name", "m"), ("stage", "1")))] == 0.25
