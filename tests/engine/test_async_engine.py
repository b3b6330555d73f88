"""The engine loop thread's own logic, against a scripted stand-in for LLMEngine (pure-logic unit tests; the real
engine is exercised end to end in test_api*.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from dataclasses import dataclass, field

import pytest

from pypto_serving.engine import async_engine
from pypto_serving.engine.async_engine import AsyncEngine, State


@dataclass
class Out:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    new_logprobs: None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class ScriptedEngine:
    """One token per step per request until max_tokens; `fail_next_step` makes step() raise once."""

    requests: dict[str, list[int]] = field(default_factory=dict)  # id -> [generated, max_tokens]
    aborted: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    steps: int = 0
    polls: int = 0
    fail_next_step: bool = False
    healthy: bool = True
    shut_down: bool = False

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def add_request(self, request_id, prompt_token_ids, params) -> None:
        self._touch()
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        self.requests[request_id] = [0, params]

    def abort_request(self, request_id) -> None:
        self._touch()
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        self._touch()
        self.polls += 1
        return bool(self.requests)

    def step(self):
        self._touch()
        self.steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device fell over")
        outs = []
        for request_id, state in list(self.requests.items()):
            state[0] += 1
            done = state[0] >= state[1]
            outs.append(Out(request_id, [100 + state[0]], done, "length" if done else None))
            if done:
                del self.requests[request_id]
        return outs

    def load(self) -> dict:
        return {"running": len(self.requests), "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0}

    def stats(self) -> dict:
        return {"prefix_cache_queries": 0, "prefix_cache_hits": 0}

    def is_healthy(self) -> bool:
        return self.healthy

    def shutdown(self) -> None:
        self._touch()
        self.shut_down = True


async def started(engine: ScriptedEngine) -> AsyncEngine:
    loaded = asyncio.Event()
    runner = AsyncEngine(lambda: engine)
    runner.start(on_state=lambda _: loaded.set())
    await asyncio.wait_for(loaded.wait(), 10)
    assert runner.state is State.READY
    return runner


async def run_request(runner: AsyncEngine, request_id: str, max_tokens: int) -> list[Out]:
    queue: asyncio.Queue[Out] = asyncio.Queue()
    await runner.add(request_id, [1, 2, 3], max_tokens, queue.put_nowait)
    outs = []
    while not (outs and outs[-1].finished):
        outs.append(await asyncio.wait_for(queue.get(), 10))
    return outs


def test_outputs_reach_their_request_and_only_the_loop_thread_calls_the_engine():
    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        a, b = await asyncio.gather(run_request(runner, "a", 3), run_request(runner, "b", 5))
        assert [o.new_token_ids[0] for o in a] == [101, 102, 103] and a[-1].finish_reason == "length"
        assert len(b) == 5 and all(o.request_id == "b" for o in b)
        assert runner.num_requests() == 0
        await runner.shutdown()
        assert engine.shut_down and engine.threads == {"engine-loop"}
        assert not runner.healthy()

    asyncio.run(main())


def test_what_loading_built_is_out_of_the_collectors_reach():
    async def main() -> None:
        engine = ScriptedEngine()
        try:
            runner = await started(engine)
            # frozen: a full collection no longer walks the model's objects (it stalled serving for 50-200 ms)
            assert not any(o is engine for o in gc.get_objects())
            assert [o.finish_reason for o in await run_request(runner, "a", 2)][-1] == "length"
            await runner.shutdown()
        finally:
            gc.unfreeze()

    asyncio.run(main())


def test_rejected_request_raises_and_leaves_nothing_behind():
    async def main() -> None:
        runner = await started(ScriptedEngine())
        with pytest.raises(ValueError, match="empty"):
            await runner.add("bad", [], 4, lambda out: None)
        assert runner.num_requests() == 0
        await runner.shutdown()

    asyncio.run(main())


def test_failed_step_errors_its_batch_and_the_loop_keeps_serving():
    async def main() -> None:
        engine = ScriptedEngine(fail_next_step=True)
        runner = await started(engine)
        failed = await run_request(runner, "x", 50)
        assert failed[-1].finish_reason == "error" and "device fell over" in failed[-1].error
        assert "x" in engine.aborted  # the core freed its blocks
        ok = await run_request(runner, "y", 2)
        assert ok[-1].finish_reason == "length"
        assert runner.healthy()
        await runner.shutdown()

    asyncio.run(main())


def test_abort_reaches_the_core_between_steps():
    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        queue: asyncio.Queue[Out] = asyncio.Queue()
        await runner.add("long", [1], 10**9, queue.put_nowait)
        await asyncio.wait_for(queue.get(), 10)
        runner.abort("long")
        deadline = time.monotonic() + 10
        while "long" not in engine.aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert "long" in engine.aborted and not engine.requests
        await runner.shutdown()

    asyncio.run(main())


def test_idle_loop_sleeps():
    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        await run_request(runner, "warm", 1)
        polls, steps = engine.polls, engine.steps
        await asyncio.sleep(0.5)
        assert engine.steps == steps
        assert engine.polls - polls <= 4  # woken by the 1 s health refresh at most, not spinning
        await runner.shutdown()

    asyncio.run(main())


def test_going_idle_releases_free_memory(monkeypatch: pytest.MonkeyPatch):
    released: list[int] = []
    monkeypatch.setattr(async_engine, "release_free_memory", lambda: released.append(1))

    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        await run_request(runner, "a", 3)
        await asyncio.sleep(0.2)
        assert released == [1]  # once, when the last request finished, not after every step
        await run_request(runner, "b", 2)
        await asyncio.sleep(0.2)
        assert released == [1, 1]
        await runner.shutdown()

    asyncio.run(main())


def test_unhealthy_engine_is_reported():
    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        engine.healthy = False
        await run_request(runner, "r", 1)  # the snapshot after a step carries the health
        assert not runner.healthy()
        await runner.shutdown()

    asyncio.run(main())


def test_load_failure_is_reported_with_the_reason():
    async def main() -> None:
        def broken() -> ScriptedEngine:
            raise FileNotFoundError("no config.json in /nowhere")

        loaded = asyncio.Event()
        runner = AsyncEngine(broken)
        runner.start(on_state=lambda _: loaded.set())
        await asyncio.wait_for(loaded.wait(), 10)
        assert runner.state is State.FAILED
        assert "no config.json in /nowhere" in (runner.load_error or "")
        assert not runner.healthy()

    asyncio.run(main())


def test_shutdown_finishes_requests_in_flight():
    async def main() -> None:
        engine = ScriptedEngine()
        runner = await started(engine)
        queue: asyncio.Queue[Out] = asyncio.Queue()
        await runner.add("stuck", [1], 10**9, queue.put_nowait)
        await asyncio.wait_for(runner.shutdown(), 10)
        last = None
        while not queue.empty():
            last = queue.get_nowait()
        assert last is not None and last.finished and last.finish_reason == "abort"
        assert engine.shut_down

    asyncio.run(main())
