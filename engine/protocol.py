"""Pydantic models of the OpenAI completions/chat API: requests (with vLLM's extra sampling fields), responses,
stream chunks and the error envelope.

Numbers are strict (``"0.5"`` or ``true`` for a float is a 400 naming the field), non-finite floats are rejected,
and unknown fields are ignored as OpenAI clients send fields this server does not use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pypto_serving.contract import OWNED_BY

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
MAX_N = 128
MAX_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields are ignored (as vLLM does)."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(RequestModel):
    include_usage: Bool = False


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names plus vLLM's extras)."""

    model: str | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    temperature: Float | None = Field(None, ge=0.0, le=100.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1)
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: Bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(strict=True, ge=0)]] | None = None
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    return_tokens_as_token_ids: Bool = False
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported")
        return None

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        """Keyword arguments for the core's SamplingParams (without the per-child seed)."""
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0 if self.top_k in (None, -1) else self.top_k,
            "min_p": self.min_p or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": list(self.stop_token_ids or []),
            "logprobs": logprobs,
        }


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Bool = False
    best_of: Int | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise ValueError("echo together with logprobs is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of must equal n (best-of sampling is not supported)")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix is not supported")
        return None


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; extra keys are kept for the chat template (e.g. tool_calls, reasoning_content)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (text parts joined, developer mapped to system)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        if self.role == "developer":
            message["role"] = "system"
        return message


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _continue(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message requires add_generation_prompt to be false")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> None:
        if value:
            raise ValueError("tools are not supported")
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (the current OpenAI name) or max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """The core's logprobs count: None when not requested, else the number of top alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- responses


def now() -> int:
    """Unix time for the `created` fields."""
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChoiceBase(BaseModel):
    """What every choice shape carries: its index and, once it ended, why."""

    index: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ResponseBase(BaseModel):
    """What every response and stream chunk carries besides its `object` and `choices`."""

    id: str
    created: int = Field(default_factory=now)
    model: str
    usage: UsageInfo | None = None


class CompletionChoice(ChoiceBase):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(ChoiceBase):
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(ResponseBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ChoiceBase):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ResponseBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = OWNED_BY  # "vllm": what routers written for vLLM (smg) recognise
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- logprobs in either response shape

TokenText = Callable[[int], str]  # a token id decoded on its own
LogprobEntry = tuple[int, float, list[tuple[int, float]], int]  # token id, logprob, top (id, logprob), text offset


def clamp_logprob(value: float) -> float:
    """JSON has no -inf or NaN."""
    return value if value == value and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def completion_logprobs(token_text: TokenText, entries: list[LogprobEntry]) -> CompletionLogprobs:
    """Completions-style logprobs (tokens, token_logprobs, top_logprobs incl. the sampled token, text_offset)."""
    out = CompletionLogprobs()
    for token_id, logprob, top, offset in entries:
        token = token_text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(clamp_logprob(logprob))
        out.text_offset.append(offset)
        alternatives = {token_text(i): clamp_logprob(v) for i, v in top}
        alternatives.setdefault(token, clamp_logprob(logprob))
        out.top_logprobs.append(alternatives)
    return out


def chat_logprobs(token_text: TokenText, entries: list[LogprobEntry]) -> ChatLogprobs:
    """Chat-style logprobs (content: token, logprob, bytes, top_logprobs)."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(token_id)
        return TopLogprob(token=text, logprob=clamp_logprob(logprob), bytes=list(text.encode()))

    return ChatLogprobs(content=[ChatTokenLogprob(**top(t, lp).model_dump(), top_logprobs=[top(i, v) for i, v in alts])
                                 for t, lp, alts, _ in entries])
