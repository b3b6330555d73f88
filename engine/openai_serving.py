"""The OpenAI handlers: POST /v1/completions and /v1/chat/completions.

A request is validated and tokenized (on the tokenize thread), fanned out into `n` core requests per prompt
(`Generation`) and answered either as SSE chunks or as one JSON body once every choice finished; each choice's text
comes from a `TextStream` (incremental detokenization + stop strings). A client that goes away has its core
requests aborted at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from pypto_serving.contract import DISPATCH_HEADER, dispatch_id_of
from pypto_serving.engine.api_errors import APIError, unavailable
from pypto_serving.engine.async_engine import Choice, Generation
from pypto_serving.engine.detokenizer import TextStream
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
    LogprobEntry,
    SamplingRequest,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
)
from pypto_serving.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pypto_serving.engine.server import ServerState

log = logging.getLogger("pypto_serving.engine")
CLIENT_CLOSED = 499  # nginx's "client closed request"
MAX_CHOICES = 1024  # prompts x n of one completions call
TEMPLATE_RESERVED = {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                     "return_dict", "return_tensors", "tools", "chat_template"}

Chunk = Callable[[Choice, str, list[LogprobEntry]], str]  # one streamed event for a choice's new text and logprobs


# ------------------------------------------------------------------------------------- admission and answers


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
        raise unavailable(str(exc), "unavailable", state.settings.retry_after_s) from exc
    return generation


def raise_for_failure(state: ServerState, generation: Generation) -> None:
    """A non-streamed response fails as a whole if a choice failed or was aborted in the engine."""
    for choice in generation.choices:
        if choice.finish_reason == "error":
            error = engine_failure(generation, choice)
            raise APIError(500, error.message, error.type, code=error.code)
        if choice.finish_reason == "abort":
            raise unavailable("the request was aborted (the engine is shutting down)", "aborted",
                              state.settings.retry_after_s)


DONE_EVENT = b"data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that always close their generation, also when the client disconnects mid-stream."""

    def __init__(self, content: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def stream_response(self, send: Send) -> None:
        """Starlette's, except that the piece ending in ``[DONE]`` also ends the body: uvicorn then writes the last
        events and the chunked terminator in one write, which a proxy reads in one wake-up instead of two."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:
            data = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
            ended = data.endswith(DONE_EVENT)
            await send({"type": "http.response.body", "body": data, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if aborted := self.generation.close():
                log.info("request %s: the stream ended early (client gone or server stopping): aborted %d choice(s)",
                         self.generation.request_id, aborted)


def sse(data: Any) -> str:
    """One SSE event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def engine_failure(generation: Generation, choice: Choice) -> ErrorInfo:
    """A choice that failed in the engine: logged under the request id, and the error its client gets."""
    log.warning("request %s: choice %d failed in the engine: %s", generation.request_id, choice.index, choice.error)
    return ErrorInfo(message=f"the engine failed: {choice.error}", type="internal_error", code="engine_error")


def stream_error(generation: Generation, choice: Choice) -> str | None:
    """The error event of a choice that failed in the engine, if it did."""
    if choice.finish_reason != "error":
        return None
    return sse({"error": engine_failure(generation, choice).model_dump()})


async def respond(state: ServerState, request: Request, body: SamplingRequest, generation: Generation, chunk: Chunk,
                  usage_chunk: Callable[[UsageInfo], BaseModel], whole: Callable[[UsageInfo], BaseModel],
                  opening: list[str] | None = None) -> Response:
    """Answer a started generation: SSE (`opening` events, one `chunk` per choice update, an error event per failed
    choice, the usage chunk if asked for, `[DONE]`), or the `whole` response once every choice finished."""
    if body.stream:
        async def events() -> AsyncIterator[str]:
            for event in opening or []:
                yield event
            last: list[str] = []
            async for c in generation.events():
                text = c.text.delta(final=c.finished)
                entries = c.take_logprobs()
                pieces = [chunk(c, text, entries)] if text or entries or c.finished else []
                if error := stream_error(generation, c):
                    pieces.append(error)
                if all(choice.finished for choice in generation.choices):
                    last = pieces  # the final update leaves with the usage chunk and [DONE]: one write
                elif pieces:
                    yield "".join(pieces)
            if body.include_usage:
                last.append(sse(usage_chunk(UsageInfo(**generation.usage())).model_dump_json()))
            yield "".join(last) + sse("[DONE]")

        return SSEResponse(events(), generation)

    if not await generation.collect(lambda: until_disconnected(request)):
        log.info("request %s: the client went away; its choices were aborted", generation.request_id)
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the core requests are aborted already
    raise_for_failure(state, generation)
    return Response(whole(UsageInfo(**generation.usage())).model_dump_json(), media_type="application/json")


# ------------------------------------------------------------------------------------------ prompts and choices


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
    vocab = state.vocab_size
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


def make_generation(state: ServerState, request: Request, body: SamplingRequest, prompts: list[list[int]],
                    max_tokens: list[int], logprobs: int | None) -> Generation:
    """n core requests per prompt, with ids `<request id>-<serial>-<choice index>`; with a seed, child i samples with
    seed + i."""
    vocab = state.vocab_size
    bad = next((t for t in body.stop_token_ids or [] if t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"stop_token_ids: token id {bad} is outside the vocabulary [0, {vocab})",
                       param="stop_token_ids")
    eos = set(getattr(state.core, "eos_token_ids", set()) or set())
    prefix = state.core_id_prefix(request.state.request_id)
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
            text = TextStream(state.core.tokenizer, ids, body.stop_strings, body.include_stop_str_in_output,
                              body.skip_special_tokens)
            choices.append(Choice(index, p, f"{prefix}-{index}", ids, params, text, state.metrics.timer(),
                                  eos | set(params.stop_token_ids)))
    return Generation(state.engine, request.state.request_id, choices, state.end,
                      dispatch_id_of(request.headers.get(DISPATCH_HEADER)))


# ------------------------------------------------------------------------------------------------- completions


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions."""
    raw = body.prompt
    prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    response_id = f"cmpl-{request.state.request_id}"

    async def prepare() -> Generation:
        state.check_model(body.model)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {MAX_CHOICES} choices per request",
                           param="n" if body.n > 1 else "prompt")
        ids = [await encode_prompt(state, p, "prompt") for p in prompts]
        limits = [max_tokens_for(state, len(p), body.max_tokens, "prompt") for p in ids]
        return make_generation(state, request, body, ids, limits, body.logprobs)

    generation = await admit_and_start(state, prepare)
    echo = [(p if isinstance(p, str) else state.core.tokenizer.decode(p)) if body.echo else "" for p in prompts]
    unechoed = set(range(len(generation.choices)))  # streamed choices whose echo was not sent yet
    model = state.settings.served_model_name

    def logprobs(entries: list[LogprobEntry]) -> CompletionLogprobs | None:
        return completion_logprobs(state.token_namer(body), entries) if body.logprobs is not None else None

    def choice(c: Choice, text: str, entries: list[LogprobEntry]) -> CompletionChoice:
        return CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                logprobs=logprobs(entries))

    def chunk(c: Choice, text: str, entries: list[LogprobEntry]) -> str:
        if c.index in unechoed:
            unechoed.discard(c.index)
            text = echo[c.prompt_index] + text
        response = CompletionResponse(id=response_id, model=model, choices=[choice(c, text, entries)])
        return sse(response.model_dump_json())

    def whole(usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(id=response_id, model=model, usage=usage, choices=[
            choice(c, echo[c.prompt_index] + c.text.delta(final=True), c.take_logprobs()) for c in generation.choices])

    return await respond(state, request, body, generation, chunk,
                         lambda usage: CompletionResponse(id=response_id, model=model, choices=[], usage=usage), whole)


# -------------------------------------------------------------------------------------------------------- chat


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
    response_id = f"chatcmpl-{request.state.request_id}"

    async def prepare() -> Generation:
        state.check_model(body.model)
        ids = await render_chat(state, body)
        limit = max_tokens_for(state, len(ids), body.requested_max_tokens, "messages")
        return make_generation(state, request, body, [ids], [limit], body.num_logprobs)

    generation = await admit_and_start(state, prepare)
    model = state.settings.served_model_name

    def logprobs(entries: list[LogprobEntry]) -> ChatLogprobs | None:
        return chat_logprobs(state.token_namer(body), entries) if body.logprobs else None

    def chunk(c: Choice, text: str, entries: list[LogprobEntry]) -> str:
        return chat_chunk(response_id, model, c.index, {"content": text} if text else {}, c.finish_reason,
                          c.stop_reason, logprobs(entries))

    def whole(usage: UsageInfo) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=response_id, model=model, usage=usage, choices=[
            ChatChoice(index=c.index, message=ChatMessageOut(content=c.text.delta(final=True)),
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason, logprobs=logprobs(c.take_logprobs()))
            for c in generation.choices])

    opening = [chat_chunk(response_id, model, c.index, {"role": "assistant", "content": ""})
               for c in generation.choices] if body.stream else None
    return await respond(state, request, body, generation, chunk,
                         lambda usage: ChatCompletionChunk(id=response_id, model=model, choices=[], usage=usage),
                         whole, opening)
