"""The LLMEngine API around the model: validation, abort, load/stats, memory over many requests, step faults."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.llm_engine import LLMEngine
from pypto_serving.engine.sampling_params import SamplingParamError, SamplingParams
from pypto_serving.engine.sequence import SequenceStatus
from tests.engine.test_llm_engine import random_prompts
from tests.support.models import hf_greedy, tiny_model_dir

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny_model_dir("qwen3"))


@pytest.fixture
def engine(model: str) -> LLMEngine:
    eng = LLMEngine(EngineConfig(model=model, num_kv_blocks=128, max_model_len=256))
    yield eng
    eng.shutdown()


def drain(engine: LLMEngine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def assert_empty(engine: LLMEngine) -> None:
    """Nothing of any finished request is left in the engine, the scheduler or the block pool."""
    bm = engine.block_manager
    assert not engine.has_unfinished_requests() and engine._requests == {}
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert len(bm.cached) <= bm.num_blocks and engine.load()["kv_cache_usage"] == 0.0


def test_engine_attributes(engine: LLMEngine, model: str) -> None:
    assert engine.max_model_len == 256 and engine.config.served_model_name == model.rstrip("/").split("/")[-1]
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids and len(engine.eos_token_ids) == 2
    assert engine.is_healthy() and engine.dtype == "float32" and engine.num_kv_blocks == 128


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], GREEDY, "empty"),
    ([5] * 250, SamplingParams(max_tokens=7), "maximum context length is 256"),
    ([5, 1024], GREEDY, r"\[0, 1024\)"),
    ([5, -1], GREEDY, "token ids"),
])
def test_add_request_rejects_bad_input(engine: LLMEngine, prompt: list[int], params: SamplingParams,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_bad_sampling_params_and_duplicate_ids(engine: LLMEngine) -> None:
    with pytest.raises(SamplingParamError) as info:
        engine.add_request("x", [5, 6], SamplingParams(top_p=1.5))
    assert info.value.param == "top_p"
    with pytest.raises(SamplingParamError) as info:
        engine.add_request("x", [5, 6], SamplingParams(stop_token_ids=[3, 1024], min_tokens=2))
    assert info.value.param == "stop_token_ids"
    engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], GREEDY)


def test_prompt_that_can_never_fit_the_kv_pool(model: str) -> None:
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=4, block_size=16))
    try:
        with pytest.raises(ValueError, match="KV cache capacity"):
            engine.add_request("big", [5] * 60, SamplingParams(max_tokens=5))
        engine.add_request("ok", [5] * 59, SamplingParams(max_tokens=5))
        assert len(drain(engine)) == 5
    finally:
        engine.shutdown()


def test_max_model_len_is_reached_exactly(engine: LLMEngine, model: str) -> None:
    prompt = random_prompts(1, (250, 250), seed=50)[0]
    engine.add_request("edge", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outs = drain(engine)
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(model, prompt, 6)
    assert outs[-1].finish_reason == "length" and outs[-1].num_prompt_tokens == 250


def test_load_counts_pending_tokens(engine: LLMEngine) -> None:
    engine.add_request("a", [5] * 10, SamplingParams(max_tokens=5))
    engine.add_request("b", [6] * 20, SamplingParams(max_tokens=7))
    assert engine.load() == {"running": 0, "waiting": 2, "pending_tokens": 10 + 5 + 20 + 7, "kv_cache_usage": 0.0,
                             "max_num_seqs": engine.scheduler.max_num_seqs, "running_remaining": []}
    engine.step()  # both prefilled, one token each
    load = engine.load()
    assert (load["running"], load["waiting"], load["pending_tokens"]) == (2, 0, 4 + 6)
    assert load["running_remaining"] == [4, 6]  # when their slots free up, the sooner first
    assert load["kv_cache_usage"] == pytest.approx(3 / 128)  # blocks of 16: 1 + 2
    engine.abort_request("a")
    engine.abort_request("a")  # idempotent
    engine.abort_request("never-existed")
    assert engine.load()["pending_tokens"] == 6 and engine.stats()["num_aborted"] == 1
    drain(engine)
    assert_empty(engine)


def test_abort_frees_a_running_request_at_once(engine: LLMEngine) -> None:
    engine.add_request("long", [5] * 40, SamplingParams(max_tokens=100))
    engine.step()
    seq = engine._requests["long"]
    assert engine.block_manager.num_free_blocks < 128
    engine.abort_request("long")
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
    assert engine.step() == []
    assert_empty(engine)


def test_a_thousand_requests_leave_nothing_behind(model: str) -> None:
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=64, block_size=4, max_num_seqs=64))
    rng = random.Random(0)
    try:
        done = aborted = 0
        for wave in range(10):
            ids = [f"w{wave}-{i}" for i in range(100)]
            for rid in ids:
                prompt = [rng.randrange(5, 1000) for _ in range(rng.randint(1, 12))]
                engine.add_request(rid, prompt, SamplingParams(max_tokens=rng.randint(1, 4), temperature=0.7))
            for step in range(1000):
                if not engine.has_unfinished_requests():
                    break
                for out in engine.step():
                    done += out.finished
                if step == 1:  # abort a few, running or waiting
                    for rid in rng.sample(ids, 5):
                        if rid in engine._requests:
                            engine.abort_request(rid)
                            aborted += 1
            assert_empty(engine)
        stats = engine.stats()
        assert done + aborted == 1000 == stats["num_finished"] + stats["num_aborted"]
        assert stats["num_failed"] == 0 and stats["num_preemptions"] >= 0
    finally:
        engine.shutdown()


def test_a_failing_step_errors_only_its_batch(engine: LLMEngine, model: str) -> None:
    runner = engine.executor.runner
    real = runner.execute
    calls = {"n": 0}

    def fail_once(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost its mind")
        return real(step)

    runner.execute = fail_once
    prompt = random_prompts(1, (9, 9), seed=51)[0]
    engine.add_request("victim", prompt, GREEDY)
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("victim", True, "error")]
    assert "device lost its mind" in outs[0].error
    assert engine.is_healthy() and engine.stats()["num_failed"] == 1
    assert_empty(engine)
    engine.add_request("next", prompt, GREEDY)
    assert [t for o in drain(engine) for t in o.new_token_ids] == hf_greedy(model, prompt, 8)


def test_a_slow_step_times_out_then_the_engine_recovers(engine: LLMEngine, model: str) -> None:
    runner = engine.executor.runner
    real = runner.execute
    calls = {"n": 0}
    release = threading.Event()

    def slow_once(step):
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(30)  # held past step_timeout_s; let go as soon as the step timed out
        return real(step)

    runner.execute = slow_once
    engine.config.step_timeout_s = 1.0  # read at every step
    prompt = random_prompts(1, (9, 9), seed=52)[0]
    engine.add_request("slow", prompt, GREEDY)
    engine.add_request("slow2", prompt[:5], GREEDY)
    try:
        outs = engine.step()
    finally:
        release.set()  # the late reply now comes well within the grace of another step_timeout_s
    assert sorted((o.request_id, o.finish_reason) for o in outs) == [("slow", "error"), ("slow2", "error")]
    assert all("timed out" in o.error for o in outs)
    assert engine.is_healthy()
    engine.add_request("next", prompt, GREEDY)
    tokens = [t for o in drain(engine) for t in o.new_token_ids]
    assert tokens == hf_greedy(model, prompt, 8) and engine.is_healthy()
    assert_empty(engine)


def test_a_step_that_never_returns_makes_the_engine_unhealthy(engine: LLMEngine) -> None:
    runner = engine.executor.runner
    real = runner.execute
    release = threading.Event()

    def hang(step):
        release.wait(60)  # past step_timeout_s and the grace of one more step_timeout_s, until the test is done
        return real(step)

    runner.execute = hang
    engine.config.step_timeout_s = 1.0  # read at every step
    try:
        engine.add_request("stuck", [5, 6, 7], GREEDY)
        assert engine.step()[0].finish_reason == "error"
        engine.add_request("queued", [5, 6, 7], GREEDY)
        outs: list = []
        deadline = time.monotonic() + 10
        while not outs and time.monotonic() < deadline:
            outs = engine.step()
        assert [(o.request_id, o.finish_reason) for o in outs] == [("queued", "error")]
        assert not engine.is_healthy()
    finally:
        release.set()


@pytest.mark.parametrize(("field", "value"), [
    ("device", "tpu"), ("dtype", "int8"), ("tensor_parallel_size", 0), ("max_num_seqs", 0),
    ("max_num_batched_tokens", -1), ("block_size", 0), ("max_model_len", 0), ("long_prefill_token_threshold", -1),
    ("num_kv_blocks", 1), ("kv_cache_memory", 0.0), ("step_timeout_s", 0.0), ("cpu_threads", 0),
])
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(model="/models/x", **{field: value})


def test_engine_rejects_what_the_model_cannot_do(model: str) -> None:
    with pytest.raises(ValueError, match="max_model_len: 5000 exceeds"):
        LLMEngine(EngineConfig(model=model, max_model_len=5000))
    with pytest.raises(ValueError, match=r"no config\.json"):
        LLMEngine(EngineConfig(model="/nonexistent/model"))
    with pytest.raises(ValueError, match="device: cuda"):
        LLMEngine(EngineConfig(model=model, device="cuda"))


def test_the_model_is_built_and_run_on_one_thread(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN/OpenMP work split over two threads (weights reordered on one, steps on another) slowed every cpu step
    by ~30%: the runner thread builds the model it runs."""
    from pypto_serving.engine import worker

    threads: dict[str, set[int]] = {"built": set(), "ran": set()}

    class Recorded(worker.ModelRunner):
        def __init__(self, *args, **kwargs) -> None:
            threads["built"].add(threading.get_ident())
            super().__init__(*args, **kwargs)

        def execute(self, step):
            threads["ran"].add(threading.get_ident())
            return super().execute(step)

    monkeypatch.setattr(worker, "ModelRunner", Recorded)
    eng = LLMEngine(EngineConfig(model=model, num_kv_blocks=64, max_model_len=128))
    try:
        prompt = random_prompts(1, (9, 9), seed=52)[0]
        eng.add_request("one", prompt, GREEDY)
        assert [t for o in drain(eng) for t in o.new_token_ids] == hf_greedy(model, prompt, 8)
    finally:
        eng.shutdown()
    assert threads["built"] == threads["ran"] and threading.get_ident() not in threads["built"]


def test_a_model_that_fails_to_load_raises_from_the_constructor(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pypto_serving.engine import worker

    class Broken(worker.ModelRunner):
        def __init__(self, *args, **kwargs) -> None:
            raise OSError("model.safetensors: truncated")

    monkeypatch.setattr(worker, "ModelRunner", Broken)
    with pytest.raises(OSError, match="truncated"):
        LLMEngine(EngineConfig(model=model, num_kv_blocks=64, max_model_len=128))
