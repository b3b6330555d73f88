"""What routing needs to know about one OpenAI request, parsed once from its JSON body."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class RequestInfo:
    """Routing view of a request: estimated pending tokens, prompt prefix text, session key."""

    stream: bool = False
    prompt_tokens: int = 0  # estimate (the gateway has no tokenizer)
    max_tokens: int = 0
    prefix_text: str = ""  # the prompt as text, for prefix hashing
    session: str | None = None  # x-session-id header or the OpenAI `user` field

    @property
    def tokens(self) -> int:
        """Estimated pending tokens of the request: prompt estimate + max_tokens."""
        return self.prompt_tokens + self.max_tokens


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _prompt_text(body: dict) -> tuple[str, int | None]:
    """The prompt as text plus its exact token count when given as token ids."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [f"{m.get('role', '')}\x00{_content_text(m.get('content'))}\x00"
                 for m in messages if isinstance(m, dict)]
        return "".join(parts), None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return ",".join(map(str, prompt)), len(prompt)
        if isinstance(first, list):
            return ",".join(map(str, first)), len(first)
        prompt = first
    return (prompt if isinstance(prompt, str) else ""), None


def request_info(body: dict, session_header: str | None = None, default_max_tokens: int = 256,
                 chars_per_token: float = 4.0) -> RequestInfo:
    """Build the routing view of a parsed request body (never raises on odd values; the engine validates)."""
    text, exact_tokens = _prompt_text(body)
    prompt_tokens = exact_tokens if exact_tokens is not None else math.ceil(len(text) / chars_per_token)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        max_tokens = default_max_tokens
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 128:
        max_tokens *= n
    user = body.get("user")
    session = session_header or (user if isinstance(user, str) and user else None)
    return RequestInfo(stream=body.get("stream") is True, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       prefix_text=text, session=session)
