"""The engine's HTTP server: the OpenAI routes plus /health, /ready, /load, /drain and /metrics.

A request is validated and tokenized on the event loop, fanned out into `n` core requests per prompt
(`Generation`), and fed by the loop thread through an asyncio queue; each choice's text comes from a
`TextStream` (incremental detokenization + stop strings). Every error leaves in the OpenAI envelope; bad input
is a 4xx, and a client that goes away has its core requests aborted at once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pypto_serving.engine.async_engine import AsyncEngine, Choice, Generation, State
from pypto_serving.engine.detokenizer import TextStream
from pypto_serving.engine.metrics import CONTENT_TYPE, EngineMetrics
from pypto_serving.engine.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)
from pypto_serving.engine.sampling_params import SamplingParams

log = logging.getLogger("pypto_serving.engine")
CLIENT_CLOSED = 499  # nginx's "client closed request"
MAX_CHOICES = 1024  # prompts x n of one completions call


class APIError(Exception):
    """An error answered in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: int | str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


@dataclass
class ServerSettings:
    """Server-side options (the engine's own options live in EngineConfig)."""

    served_model_name: str
    model: str
    drain_timeout_s: float = 120.0
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1


class ServerState:
    """Everything the routes share: the async engine, settings, metrics, drain state and in-flight count."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = EngineMetrics(settings.served_model_name, engine.snapshot, lambda: self.draining)
        self.draining = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.request_exit: Callable[[], None] = lambda: None  # set by the CLI: makes uvicorn exit
        self._token_text: dict[int, str] = {}
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

    def admit(self) -> None:
        """Raise 503 unless new work is accepted now."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining:
            raise APIError(503, "the engine is draining and accepts no new requests", "service_unavailable",
                           code="draining", headers=retry)
        if self.engine.state is State.LOADING:
            raise APIError(503, "the model is still loading", "service_unavailable", code="loading", headers=retry)
        if not self.engine.ready or not self.engine.healthy():
            raise APIError(503, "the engine is not healthy", "service_unavailable", code="unhealthy", headers=retry)

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


# ---------------------------------------------------------------------------------------------- responses


async def until_disconnected(request: Request) -> None:
    """Return once the client has gone away (the body was read already, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def admit_and_start(state: ServerState, prepare: Callable[[], Awaitable[Generation]]) -> Generation:
    """Admit a request (from here it counts as in flight, so a drain waits for it), prepare its generation and hand
    it to the engine: a rejection is a 400, an engine going away a 503."""
    state.admit()
    state.begin()
    try:
        generation = await prepare()
    except BaseException:
        state.end()
        raise
    try:
        await generation.start()  # on failure the generation closes itself, which ends the in-flight count
    except ValueError as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", None)) from exc
    except RuntimeError as exc:
        raise APIError(503, str(exc), "service_unavailable", code="unavailable",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from exc
    return generation


def raise_for_failure(state: ServerState, generation: Generation) -> None:
    """A non-streamed response fails as a whole if a choice failed or was aborted in the engine."""
    for choice in generation.choices:
        if choice.finish_reason == "error":
            raise APIError(500, f"the engine failed: {choice.error}", "internal_error", code="engine_error")
        if choice.finish_reason == "abort":
            raise APIError(503, "the request was aborted (the engine is shutting down)", "service_unavailable",
                           code="aborted", headers={"Retry-After": str(state.settings.retry_after_s)})


class SSEResponse(StreamingResponse):
    """Server-sent events that always close their generation, also when the client disconnects mid-stream."""

    def __init__(self, content: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


def sse(data: Any) -> str:
    """One SSE event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def stream_error(choice: Choice) -> str | None:
    """The error event of a choice that failed in the engine, if it did."""
    if choice.finish_reason != "error":
        return None
    error = ErrorInfo(message=f"the engine failed: {choice.error}", type="internal_error", code="engine_error")
    return sse({"error": error.model_dump()})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------- OpenAI routes

TEMPLATE_RESERVED = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                     "return_dict", "return_tensors", "tools", "chat_template"}


async def encode_prompt(state: ServerState, prompt: str | list[int], param: str, special: bool = True) -> list[int]:
    """Token ids of one prompt, checked: not empty, not hopelessly long, every id inside the vocabulary."""
    if isinstance(prompt, str) and len(prompt) > state.max_prompt_chars:
        raise APIError(400, f"{param} has {len(prompt)} characters, more than fit this model's maximum context "
                            f"length of {state.core.max_model_len} tokens", param=param)
    if isinstance(prompt, str) and prompt:
        ids = await state.in_tokenize_thread(lambda: state.encoder.encode(prompt, add_special_tokens=special))
    else:
        ids = list(prompt)
    if not ids:
        raise APIError(400, f"{param} must not be empty", param=param)
    vocab = int(getattr(state.core, "vocab_size", 0) or len(state.core.tokenizer))
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} in {param} is outside the vocabulary [0, {vocab})", param=param)
    return ids


def max_tokens_for(state: ServerState, prompt_len: int, requested: int | None, param: str) -> int:
    """max_tokens checked against the model length (None: all the room the prompt leaves)."""
    limit = int(state.core.max_model_len)
    if prompt_len >= limit:
        raise APIError(400, f"the prompt is {prompt_len} tokens, but this model's maximum context length is {limit} "
                            "tokens (prompt and output together)", param=param)
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but {prompt_len + requested} "
                            f"were requested ({prompt_len} in the prompt, {requested} to generate); reduce the prompt "
                            "or max_tokens", param="max_tokens")
    return requested


def make_choices(state: ServerState, body: SamplingRequest, prompts: list[list[int]], max_tokens: list[int],
                 logprobs: int | None, response_id: str) -> list[Choice]:
    """n core requests per prompt; with a seed, child i samples with seed + i."""
    stops = body.stop_strings
    vocab = int(getattr(state.core, "vocab_size", 0) or len(state.core.tokenizer))
    bad = next((t for t in body.stop_token_ids or [] if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})",
                       param="stop_token_ids")
    eos = set(getattr(state.core, "eos_token_ids", set()) or set())
    choices = []
    for p, (ids, limit) in enumerate(zip(prompts, max_tokens, strict=True)):
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            try:
                params = SamplingParams(**body.sampling_kwargs(limit, logprobs), seed=seed)
                params.validate()
            except ValueError as exc:
                raise APIError(400, str(exc), param=getattr(exc, "param", None)) from exc
            index = p * body.n + i
            text = TextStream(state.core.tokenizer, ids, stops, body.include_stop_str_in_output,
                              body.skip_special_tokens)
            choices.append(Choice(index, p, f"{response_id}-{index}", ids, params, text, state.metrics.timer(),
                                  eos | set(params.stop_token_ids)))
    return choices


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions."""
    raw = body.prompt
    prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    response_id = new_id("cmpl")

    async def prepare() -> Generation:
        state.check_model(body.model)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {MAX_CHOICES} choices per request",
                           param="n" if body.n > 1 else "prompt")
        ids = [await encode_prompt(state, p, "prompt") for p in prompts]
        limits = [max_tokens_for(state, len(p), body.max_tokens, "prompt") for p in ids]
        return Generation(state.engine, make_choices(state, body, ids, limits, body.logprobs, response_id), state.end)

    generation = await admit_and_start(state, prepare)
    echo = [(p if isinstance(p, str) else state.core.tokenizer.decode(p)) if body.echo else "" for p in prompts]
    model = state.settings.served_model_name

    def logprobs(entries: list[Any]) -> CompletionLogprobs | None:
        return completion_logprobs(state.token_namer(body), entries) if body.logprobs is not None else None

    if body.stream:
        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            async for c in generation.events():
                text = c.text.delta(final=c.finished)
                if c.index not in started:
                    started.add(c.index)
                    text = echo[c.index // body.n] + text
                entries = c.take_logprobs()
                if text or entries or c.finished:
                    choice = CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason,
                                              stop_reason=c.stop_reason, logprobs=logprobs(entries))
                    yield sse(CompletionResponse(id=response_id, model=model, choices=[choice]).model_dump_json())
                if error := stream_error(c):
                    yield error
            if body.include_usage:
                usage = UsageInfo(**generation.usage())
                yield sse(CompletionResponse(id=response_id, model=model, choices=[], usage=usage).model_dump_json())
            yield sse("[DONE]")

        return SSEResponse(events(), generation)

    if not await generation.collect(lambda: until_disconnected(request)):
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the core requests are aborted already
    raise_for_failure(state, generation)
    choices = [CompletionChoice(index=c.index, text=echo[c.index // body.n] + c.text.delta(final=True),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                logprobs=logprobs(c.take_logprobs())) for c in generation.choices]
    response = CompletionResponse(id=response_id, model=model, choices=choices, usage=UsageInfo(**generation.usage()))
    return Response(response.model_dump_json(), media_type="application/json")


async def render_chat(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The prompt ids of a chat request, rendered by the tokenizer's own chat template."""
    if not getattr(state.encoder, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in TEMPLATE_RESERVED}
    messages = [m.template_dict() for m in body.messages]
    if sum(len(str(m.get("content") or "")) for m in messages) > state.max_prompt_chars:
        raise APIError(400, "the messages are longer than fit this model's maximum context length", param="messages")

    def render() -> str:
        return state.encoder.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt,
                                                 continue_final_message=body.continue_final_message, **kwargs)

    try:
        text = await state.in_tokenize_thread(render)
    except Exception as exc:  # jinja raise_exception, bad roles, bad kwargs: the caller's input
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
    return await encode_prompt(state, text, "messages", special=False)


def chat_chunk(response_id: str, model: str, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               stop_reason: int | str | None = None, logprobs: ChatLogprobs | None = None) -> str:
    """One chat.completion.chunk event (the delta carries only the fields it sets)."""
    chunk = ChatCompletionChunk(id=response_id, model=model, choices=[
        ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=finish_reason, stop_reason=stop_reason,
                        logprobs=logprobs)]).model_dump()
    chunk["choices"][0]["delta"] = delta
    return sse(chunk)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    """POST /v1/chat/completions."""
    response_id = new_id("chatcmpl")

    async def prepare() -> Generation:
        state.check_model(body.model)
        ids = await render_chat(state, body)
        limit = max_tokens_for(state, len(ids), body.requested_max_tokens, "messages")
        return Generation(state.engine, make_choices(state, body, [ids], [limit], body.num_logprobs, response_id),
                          state.end)

    generation = await admit_and_start(state, prepare)
    model = state.settings.served_model_name

    if body.stream:
        async def events() -> AsyncIterator[str]:
            for c in generation.choices:
                yield chat_chunk(response_id, model, c.index, {"role": "assistant", "content": ""})
            async for c in generation.events():
                text = c.text.delta(final=c.finished)
                entries = c.take_logprobs()
                if text or entries or c.finished:
                    yield chat_chunk(response_id, model, c.index, {"content": text} if text else {},
                                     c.finish_reason, c.stop_reason,
                                     chat_logprobs(state.token_namer(body), entries) if body.logprobs else None)
                if error := stream_error(c):
                    yield error
            if body.include_usage:
                usage = UsageInfo(**generation.usage())
                yield sse(ChatCompletionChunk(id=response_id, model=model, choices=[], usage=usage).model_dump_json())
            yield sse("[DONE]")

        return SSEResponse(events(), generation)

    if not await generation.collect(lambda: until_disconnected(request)):
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the core requests are aborted already
    raise_for_failure(state, generation)
    choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text.delta(final=True)),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                          logprobs=chat_logprobs(state.token_namer(body), c.take_logprobs()) if body.logprobs else None)
               for c in generation.choices]
    response = ChatCompletionResponse(id=response_id, model=model, choices=choices,
                                      usage=UsageInfo(**generation.usage()))
    return Response(response.model_dump_json(), media_type="application/json")


# ------------------------------------------------------------------------------------------------- the app


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, judged from Content-Length before reading any of it and
    enforced while reading a chunked body (the excess is discarded, never buffered)."""

    DISCARD_LIMIT = 64 * 1024 * 1024  # beyond this the connection is simply closed after the 413

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.DISCARD_LIMIT:
                await self._discard(receive)
            await self._reject(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await self._discard(receive, size)
                await self._reject(send)
                return
            chunks.append(body)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, seen: int = 0) -> None:
        while seen <= self.DISCARD_LIMIT:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _reject(self, send: Send) -> None:
        error = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        body = error.response().body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    if not loc:
        return APIError(400, f"the request body must be a JSON object ({first.get('msg', 'invalid')})")
    # a value matching no member of a union (prompt, stop, content) fails once per member: name the members
    members = list(dict.fromkeys(str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and e["loc"][1] == loc[0]
                                 and not str(e["loc"][2]).isdigit()))
    if len(members) > 1:
        return APIError(400, f"{loc[0]}: expected one of {', '.join(members)}", param=loc[0])
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return APIError(400, f"{'.'.join(loc)}: {message}{more}", param=loc[0])


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

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=exc.status_code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "state": engine.state.value},
                            status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            status = "draining"
        elif not engine.healthy():
            status = "unhealthy"
        else:
            status = "ready" if engine.ready else engine.state.value
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/load")
    async def load() -> JSONResponse:
        snapshot, _ = engine.snapshot()
        return JSONResponse({"running": int(snapshot.get("running", 0)), "waiting": int(snapshot.get("waiting", 0)),
                             "pending_tokens": int(snapshot.get("pending_tokens", 0)),
                             "kv_cache_usage": float(snapshot.get("kv_cache_usage", 0.0)),
                             "draining": state.draining})

    @app.post("/drain")
    async def drain() -> JSONResponse:
        state.drain()
        return JSONResponse({"draining": True, "inflight": state.inflight})

    @app.get("/metrics")
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

