"""The engine's HTTP app: lifecycle (loading, health, drain), /health, /ready, /load, /drain, /metrics, /v1/models,
the endpoints routers written for vLLM probe (/version, /get_load), and the wiring of the OpenAI routes
(openai_serving.py) and of the error envelope (api_errors.py). /drain and its undo need the operator's token
(control.py).

`ServerState` is what every route shares: the async engine, admission (loading / draining / unhealthy are 503s),
the in-flight count a drain waits on, and the tokenize thread.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from pypto_serving import __version__
from pypto_serving.contract import (
    AUTHORIZATION_HEADER,
    PATH_DRAIN,
    PATH_GET_LOAD,
    PATH_HEALTH,
    PATH_LOAD,
    PATH_METRICS,
    PATH_READY,
    PATH_VERSION,
    REQUEST_ID_HEADER,
    LoadReport,
)
from pypto_serving.engine.api_errors import APIError, BodyLimit, install_error_handlers, unavailable
from pypto_serving.engine.async_engine import AsyncEngine, State
from pypto_serving.engine.control import ControlAuth
from pypto_serving.engine.load_feed import LoadFeed
from pypto_serving.engine.metrics import CONTENT_TYPE, EngineMetrics
from pypto_serving.engine.openai_serving import create_chat_completion, create_completion
from pypto_serving.engine.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
)

log = logging.getLogger("pypto_serving.engine")
MAX_REQUEST_ID_LEN = 128


@dataclass
class ServerSettings:
    """Server-side options (the engine's own options live in EngineConfig)."""

    served_model_name: str
    model: str
    drain_timeout_s: float = 120.0
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    control_token_file: str | None = None  # POST/DELETE /drain need this file's token; None: they answer 403


class ServerState:
    """Everything the routes share: the async engine, settings, metrics, drain state and in-flight count."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = EngineMetrics(settings.served_model_name, engine.snapshot, lambda: self.draining)
        self.control = ControlAuth(settings.control_token_file)
        self.draining = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.request_exit: Callable[[], None] = lambda: None  # set by the CLI: makes uvicorn exit
        self.feed: LoadFeed | None = None  # the pushed load (set by build_app)
        self._token_text: dict[int, str] = {}
        self._serial = itertools.count()
        self._exit_task: asyncio.Task[None] | None = None
        # Tokenizing (and chat templates) run on one worker thread, on a private copy of the tokenizer, so a huge
        # prompt never stalls the event loop (HF tokenizers release the GIL) and no tokenizer is shared by threads.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.encoder: Any = None
        self.max_prompt_chars = 0

    def on_ready(self) -> None:
        """The engine loaded: prepare the tokenize thread's tokenizer and the prompt length pre-check."""
        self.encoder = copy.deepcopy(self.core.tokenizer)
        longest = max((len(token) for token in self.encoder.get_vocab()), default=1)
        # no token covers more characters than its own string: longer texts cannot fit the context
        self.max_prompt_chars = int(self.core.max_model_len) * max(longest, 1)

    async def in_tokenize_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (which may use `self.encoder`) on the tokenize thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def core(self) -> Any:
        """The loaded LLMEngine (read-only use: tokenizer, max_model_len, eos_token_ids)."""
        return self.engine.engine

    @property
    def vocab_size(self) -> int:
        """Token ids must be below this."""
        return int(getattr(self.core, "vocab_size", 0) or len(self.core.tokenizer))

    def admit(self) -> None:
        """Raise 503 unless new work is accepted now."""
        retry = self.settings.retry_after_s
        if self.draining:
            raise unavailable("the engine is draining and accepts no new requests", "draining", retry)
        if self.engine.state is State.LOADING:
            raise unavailable("the model is still loading", "loading", retry)
        if not self.engine.ready or not self.engine.healthy():
            raise unavailable("the engine is not healthy", "unhealthy", retry)

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is the served model (a missing name means the served model)."""
        if name is not None and name != self.settings.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (for logprobs), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.core.tokenizer.decode([token_id])
        return text

    def token_namer(self, body: SamplingRequest) -> Callable[[int], str]:
        """How logprobs name tokens: their text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
        return (lambda token_id: f"token_id:{token_id}") if body.return_tokens_as_token_ids else self.token_text

    def core_id_prefix(self, request_id: str) -> str:
        """The prefix of a call's core request ids: its request id, made unique (clients may reuse theirs)."""
        return f"{request_id}-{next(self._serial)}"

    def begin(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    def drain(self) -> None:
        """Stop admitting new requests; in-flight ones finish."""
        if not self.draining:
            log.info("draining: %d request(s) in flight", self.inflight)
        self.draining = True
        self.load_changed()

    def undrain(self) -> None:
        """Admit new requests again (409 once a SIGTERM drain is on its way to exiting)."""
        if self._exit_task is not None:
            raise APIError(409, "the engine is shutting down; its drain cannot be undone", "conflict",
                           code="shutting_down")
        if self.draining:
            log.info("drain undone: admitting requests again")
        self.draining = False
        self.load_changed()

    def load_changed(self) -> None:
        """Push a load update now (the drain state is part of it)."""
        if self.feed is not None:
            self.feed.changed()

    def drain_and_exit(self, timeout_s: float | None = None) -> None:
        """Drain, then exit once idle or at the deadline (in-flight requests are then aborted)."""
        self.drain()
        if self._exit_task is None:
            timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
            self._exit_task = asyncio.get_running_loop().create_task(self._exit_when_idle(timeout))

    async def _exit_when_idle(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain deadline (%.0fs) passed with %d request(s) in flight: aborting them",
                        timeout, self.inflight)
            self.engine.abort_all("the engine shut down at its drain deadline")
        self.request_exit()


def request_id_of(value: bytes | None) -> str:
    """The client's x-request-id if it is 1-128 printable ASCII characters without spaces, else a new id."""
    text = (value or b"").decode("latin-1")
    if 0 < len(text) <= MAX_REQUEST_ID_LEN and all("!" <= ch <= "~" for ch in text):
        return text
    return uuid.uuid4().hex


class RequestId:
    """ASGI middleware: every request gets an id (the client's x-request-id, else a new one) in
    `request.state.request_id`, echoed as x-request-id on its response: streamed or not, errors and 413s included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(dict(scope["headers"]).get(REQUEST_ID_HEADER.encode()))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app around an AsyncEngine; the engine starts loading when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state.server
        engine.start(on_state=lambda s: _on_engine_state(state, s))
        yield
        state.close()
        await engine.shutdown()

    app = FastAPI(title="pypto-serving engine", lifespan=lifespan)
    state = ServerState(engine, settings)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)  # added last: the outermost, so a 413 carries the id too
    install_error_handlers(app)

    @app.get(PATH_HEALTH)
    async def health() -> JSONResponse:
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "state": engine.state.value},
                            status_code=200 if ok else 503)

    @app.get(PATH_READY)
    async def ready() -> JSONResponse:
        if state.draining:
            status = "draining"
        elif not engine.healthy():
            status = "unhealthy"
        else:
            status = "ready" if engine.ready else engine.state.value
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    def load_report(snapshot: dict[str, Any] | None = None) -> LoadReport:
        snapshot = engine.snapshot()[0] if snapshot is None else snapshot
        return LoadReport(running=int(snapshot.get("running", 0)), waiting=int(snapshot.get("waiting", 0)),
                          pending_tokens=int(snapshot.get("pending_tokens", 0)),
                          kv_cache_usage=float(snapshot.get("kv_cache_usage", 0.0)), draining=state.draining,
                          max_num_seqs=snapshot.get("max_num_seqs"),  # None until the engine is loaded
                          running_remaining=snapshot.get("running_remaining"),
                          dp_rank=snapshot.get("dp_rank"), dp_size=snapshot.get("dp_size"))

    feed = state.feed = engine.feed = LoadFeed(load_report)

    @app.get(PATH_LOAD)
    async def load(watch: str | None = None) -> Response:
        """The engine's load; with ``?watch=1``, pushed as server-sent events (engine/load_feed.py)."""
        if watch not in (None, "", "0", "false"):
            if feed.full():
                raise unavailable("too many load watchers", "watchers", settings.retry_after_s)
            return StreamingResponse(feed.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})
        return JSONResponse(load_report().to_json())

    @app.get(PATH_GET_LOAD, include_in_schema=False)
    async def get_load() -> JSONResponse:
        """vllm-router's power_of_two polls this: {"load": N}, the lower the better (here: pending tokens)."""
        report = load_report()
        return JSONResponse({"load": report.pending_tokens, "running": report.running, "waiting": report.waiting})

    @app.get(PATH_VERSION, include_in_schema=False)
    async def version() -> JSONResponse:
        """vLLM's `GET /version`: smg takes a worker that answers it for a vLLM one."""
        return JSONResponse({"version": __version__})

    @app.post(PATH_DRAIN, include_in_schema=False)
    async def drain(request: Request) -> JSONResponse:
        """Stop admitting requests (the operator's token required); in-flight ones finish."""
        state.control.check(request.headers.get(AUTHORIZATION_HEADER))
        state.drain()
        return JSONResponse({"draining": True, "inflight": state.inflight})

    @app.delete(PATH_DRAIN, include_in_schema=False)
    async def undrain(request: Request) -> JSONResponse:
        """Undo a drain (the operator's token required): /ready and /load say ready and not draining again."""
        state.control.check(request.headers.get(AUTHORIZATION_HEADER))
        state.undrain()
        return JSONResponse({"draining": False, "inflight": state.inflight})

    @app.get(PATH_METRICS)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        max_len = getattr(state.core, "max_model_len", None) if engine.ready else None
        return ModelList(data=[ModelCard(id=settings.served_model_name, root=settings.model, max_model_len=max_len)])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    return app


def _on_engine_state(state: ServerState, engine_state: State) -> None:
    if engine_state is State.FAILED:
        log.error("the model failed to load: %s", state.engine.load_error)
        state.request_exit()
    elif engine_state is State.READY:
        state.on_ready()
        log.info("ready: serving %s", state.settings.served_model_name)

