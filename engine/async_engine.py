"""The engine loop thread, which owns the synchronous LLMEngine, and the asyncio side of each API call.

One thread builds the LLMEngine (the model loads in the background while the HTTP server already answers), then
loops: apply queued add/abort commands, run one `step()`, hand the outputs to the event loop in one
`call_soon_threadsafe`, publish a load/stats snapshot. It sleeps on a condition when there is nothing to do.
Nothing else ever calls into the LLMEngine, so the engine needs no locks and `/load` never waits for a step.

`Generation` is one API call on the event loop: its `n` choices per prompt as core requests, their outputs merged
from one queue into per-choice text (`TextStream`), logprobs and finish reasons; closing it aborts whatever is
still running, so a client that goes away frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pypto_serving.startup import freeze_startup_objects, release_free_memory

if TYPE_CHECKING:
    from pypto_serving.engine.detokenizer import TextStream
    from pypto_serving.engine.load_feed import LoadFeed
    from pypto_serving.engine.metrics import RequestTimer
    from pypto_serving.engine.protocol import LogprobEntry

log = logging.getLogger("pypto_serving.engine")

IDLE_WAKEUP_S = 1.0  # an idle loop still wakes this often to refresh the health snapshot
IDLE_LOAD = {"running": 0, "waiting": 0, "pending_tokens": 0, "kv_cache_usage": 0.0}

Sink = Callable[[Any], None]  # receives the core's RequestOutput objects, on the event loop


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: Any
    accepted: asyncio.Future[None]
    dispatch_id: str | None = None  # the gateway's id of this attempt, listed in the pushed load once admitted


@dataclass
class _ErrorOutput:
    """What a request gets when the step that ran it raised (same fields the server reads on RequestOutput)."""

    request_id: str
    error: str
    finish_reason: str = "error"
    finished: bool = True
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class AsyncEngine:
    """Runs an LLMEngine on its own thread; add/abort from asyncio, outputs arrive through per-request sinks."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        self._factory = engine_factory
        self.engine: Any = None  # set by the loop thread once loaded; read-only attributes for others
        self.state = State.LOADING
        self.load_error: str | None = None
        self._cond = threading.Condition()
        self._commands: list[_Add | str] = []  # _Add, or a request id to abort
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[str, Sink] = {}  # event-loop side only
        self._snapshot: tuple[dict[str, Any], dict[str, Any]] = (dict(IDLE_LOAD), {})
        self._healthy = True
        self._on_state: Callable[[State], None] | None = None
        self.feed: LoadFeed | None = None  # pushed load (GET /load?watch=1): every new snapshot goes to it
        self._admitted: list[tuple[str, str]] = []  # loop thread: (core id, dispatch id) since the last snapshot

    # ------------------------------------------------------------------ event-loop side

    def start(self, on_state: Callable[[State], None] | None = None) -> None:
        """Start the loop thread (it loads the model first); `on_state` runs on the event loop after loading."""
        self._loop = asyncio.get_running_loop()
        self._on_state = on_state
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Loaded and not stopped."""
        return self.state is State.READY

    def healthy(self) -> bool:
        """False once the loop thread died or the engine reports its workers unhealthy."""
        if self.state in (State.FAILED, State.STOPPED):
            return False
        return self._healthy and self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The latest (load, stats) published by the loop thread; never blocks."""
        return self._snapshot

    def num_requests(self) -> int:
        """Requests the server still waits on."""
        return len(self._sinks)

    async def add(self, request_id: str, prompt_token_ids: list[int], params: Any, sink: Sink,
                  dispatch_id: str | None = None) -> None:
        """Queue a request; returns once the engine accepted it (ValueError if it rejected it). ``dispatch_id``: the
        gateway's id of this attempt, listed in the next pushed load update once admitted."""
        if not self.ready or not self.healthy():
            raise RuntimeError("the engine is not ready")
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sinks[request_id] = sink
        self._push(_Add(request_id, prompt_token_ids, params, accepted, dispatch_id))
        try:
            await accepted
        except ValueError:
            self._sinks.pop(request_id, None)
            raise
        except BaseException:  # cancelled (client gone) or the loop stopped: make sure the core forgets it
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent); its sink gets nothing more."""
        if self._sinks.pop(request_id, None) is not None:
            self._push(request_id)
            if self.feed is not None:
                self.feed.finished(request_id)

    def abort_all(self, reason: str = "aborted", finish_reason: str = "abort") -> None:
        """Abort every request; each sink gets a final output with `finish_reason`."""
        for request_id, sink in list(self._sinks.items()):
            self.abort(request_id)
            sink(_ErrorOutput(request_id, reason, finish_reason=finish_reason))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread, which then shuts the engine down; waits up to `timeout` seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self.abort_all("the engine shut down")
        self.state = State.STOPPED

    def _push(self, command: _Add | str) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _dispatch(self, outputs: list[Any]) -> None:
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if out.finished and self.feed is not None:
                self.feed.finished(out.request_id)
            if sink is not None:
                sink(out)

    def _loaded(self, state: State) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    # ------------------------------------------------------------------ loop thread

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: the process is exiting
            self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[union-attr]

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.engine = self._factory()
        except BaseException as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed")
            self._call(self._loaded, State.FAILED)
            return
        log.info("model loaded in %.1fs", time.monotonic() - started)
        if getattr(self.engine, "dp", None) is not None:  # DP+EP: a peer that starts a wave wakes this loop
            self.engine.dp.waker = self._wake
        freeze_startup_objects()
        self._publish()
        self._call(self._loaded, State.READY)
        try:
            self._serve()
        except BaseException:
            log.exception("the engine loop crashed")
            self._healthy = False
            self._call(self.abort_all, "the engine loop crashed", "error")
        finally:
            with self._cond:
                leftover, self._commands = self._commands, []
            for command in leftover:
                if isinstance(command, _Add):
                    self._call(_resolve, command.accepted, RuntimeError("the engine is shutting down"))
            try:
                self.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")

    def _serve(self) -> None:
        engine = self.engine
        active: set[str] = set()
        busy = False
        while True:
            with self._cond:
                if not self._commands and not self._stopping and not busy:
                    self._cond.wait(IDLE_WAKEUP_S)
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(engine, command, active)
            outputs = self._step(engine, active) if engine.has_unfinished_requests() else []
            active.difference_update(out.request_id for out in outputs if out.finished)
            was_busy, busy = busy, engine.has_unfinished_requests()
            self._publish()  # before the outputs: whoever sees a request finish also sees the load and health after it
            if outputs:
                self._call(self._dispatch, outputs)
            if was_busy and not busy:  # gone idle: what the busy period freed leaves RSS (~5 ms)
                release_free_memory()

    def _apply(self, engine: Any, command: _Add | str, active: set[str]) -> None:
        if isinstance(command, str):
            engine.abort_request(command)
            active.discard(command)
            return
        try:
            engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as exc:  # ValueError: bad input (400); anything else: the engine cannot take it (503)
            self._call(_resolve, command.accepted, exc if isinstance(exc, ValueError) else RuntimeError(str(exc)))
            return
        active.add(command.request_id)
        if command.dispatch_id is not None:
            self._admitted.append((command.request_id, command.dispatch_id))
        self._call(_resolve, command.accepted, None)

    def _step(self, engine: Any, active: set[str]) -> list[Any]:
        try:
            return engine.step()
        except Exception as exc:  # the core reports worker failures as outputs; anything else fails the batch
            log.exception("engine step failed")
            failed = []
            for request_id in sorted(active):
                try:
                    engine.abort_request(request_id)
                except Exception:
                    log.exception("abort after a failed step")
                failed.append(_ErrorOutput(request_id, f"engine step failed: {type(exc).__name__}: {exc}"))
            return failed

    def _publish(self) -> None:
        engine = self.engine
        try:
            load = dict(engine.load())
            changed = load != self._snapshot[0]
            self._snapshot = (load, dict(engine.stats()))
            self._healthy = bool(engine.is_healthy())
        except Exception:
            log.exception("engine load/stats failed")
            self._healthy = False
            return
        if changed or self._admitted:  # the pushed load: this snapshot with the requests admitted before it
            admitted, self._admitted = self._admitted, []
            if self.feed is not None:
                self._call(self.feed.publish, load, admitted)


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# ------------------------------------------------------------------------ the asyncio side of one API call


@dataclass
class Choice:
    """One core request: choice `index` of a response, for prompt `prompt_index`."""

    index: int
    prompt_index: int
    request_id: str
    prompt_ids: list[int]
    params: Any
    text: TextStream
    timer: RequestTimer
    stop_ids: set[int]  # tokens that end the text without being part of it (EOS, stop_token_ids)
    tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list[LogprobEntry] = field(default_factory=list)  # not handed out yet

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_logprobs(self) -> list[LogprobEntry]:
        """(token id, logprob, top alternatives, text offset) entries not handed out yet."""
        out, self.logprobs = self.logprobs, []
        return out


class Generation:
    """The core requests of one API call (n choices per prompt) and their merged outputs."""

    def __init__(self, engine: AsyncEngine, request_id: str, choices: list[Choice],
                 on_close: Callable[[], None] = lambda: None, dispatch_id: str | None = None) -> None:
        self.engine = engine
        self.request_id = request_id  # the API call's id (x-request-id), the prefix of its choices' core ids
        self.dispatch_id = dispatch_id  # the gateway's attempt id (x-pypto-dispatch), if it sent one
        self.choices = choices
        self.by_id = {c.request_id: c for c in choices}
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.on_close = on_close
        self.closed = False

    async def start(self) -> None:
        """Hand every choice to the engine; on a rejection (ValueError) nothing stays behind."""
        try:
            last = self.choices[-1]  # the pushed load lists the call once all its choices are in
            for choice in self.choices:
                await self.engine.add(choice.request_id, choice.prompt_ids, choice.params, self.queue.put_nowait,
                                      self.dispatch_id if choice is last else None)
        except BaseException:
            self.close()
            raise

    async def events(self) -> AsyncIterator[Choice]:
        """Yield a choice each time it got new tokens or finished, until all finished."""
        pending = sum(not c.finished for c in self.choices)
        while pending:
            out = await self.queue.get()
            choice = self.by_id.get(out.request_id)
            if choice is None or choice.finished:
                continue
            self._apply(choice, out)
            if choice.finished:
                pending -= 1
                choice.timer.on_finish(choice.finish_reason or "abort", len(choice.prompt_ids))
            yield choice

    def _apply(self, choice: Choice, out: Any) -> None:
        ids = list(out.new_token_ids)
        entries = [(float(lp.logprob), [(int(i), float(v)) for i, v in lp.top]) for lp in out.new_logprobs or []]
        choice.cached_tokens = max(choice.cached_tokens, int(getattr(out, "num_cached_tokens", 0) or 0))
        choice.timer.on_tokens(len(ids))
        for k, token_id in enumerate(ids):
            choice.tokens += 1
            if k < len(entries):
                choice.logprobs.append((token_id, entries[k][0], entries[k][1], len(choice.text.text)))
            if out.finished and k == len(ids) - 1 and out.finish_reason == "stop" and token_id in choice.stop_ids:
                if token_id in choice.params.stop_token_ids:
                    choice.stop_reason = token_id
                continue  # the EOS / stop token ends the text without being part of it
            if choice.text.add(token_id):  # a stop string: this choice is done, the core stops at once
                choice.finish_reason, choice.stop_reason = "stop", choice.text.stop_reason
                self.engine.abort(choice.request_id)
                return
        if out.finished:
            choice.text.finish()
            choice.finish_reason = out.finish_reason or "stop"
            choice.error = getattr(out, "error", None)

    async def collect(self, until_disconnected: Callable[[], Awaitable[None]]) -> bool:
        """Run to the end (True), unless `until_disconnected()` returns first (then abort everything: False)."""
        work = asyncio.ensure_future(self._consume())
        watch = asyncio.ensure_future(until_disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                return False
            work.result()
            return True
        finally:
            watch.cancel()
            work.cancel()
            self.close()

    async def _consume(self) -> None:
        async for _ in self.events():
            pass

    def close(self) -> int:
        """Abort unfinished choices and run `on_close` (idempotent); returns how many choices it aborted."""
        if self.closed:
            return 0
        self.closed = True
        unfinished = [c for c in self.choices if not c.finished]
        for choice in unfinished:
            self.engine.abort(choice.request_id)
            choice.finish_reason = "abort"
            choice.timer.on_finish("abort", len(choice.prompt_ids))
        self.on_close()
        return len(unfinished)

    def usage(self) -> dict[str, Any]:
        """OpenAI usage: prompt tokens once per prompt, completion tokens over all choices."""
        prompts: dict[int, tuple[int, int]] = {}
        for c in self.choices:
            prompts[c.prompt_index] = (len(c.prompt_ids), max(prompts.get(c.prompt_index, (0, 0))[1], c.cached_tokens))
        prompt_tokens = sum(p for p, _ in prompts.values())
        completion_tokens = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}
