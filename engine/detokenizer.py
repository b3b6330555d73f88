"""Incremental detokenization and stop strings for one generated sequence.

`IncrementalDetokenizer` uses vLLM's prefix_offset/read_offset technique: each new token is converted to its
token string once, and only a short window of recent tokens is turned back into text, so the cost per token does
not grow with the sequence. Text that ends in an incomplete UTF-8 sequence (U+FFFD) is held back until the
following tokens complete it. `TextStream` adds stop strings on top: text that could still be the start of a
stop string is held back while streaming, so a stop string never leaks into the output.
"""

from __future__ import annotations

from typing import Any

# The prompt tokens the detokenizer is primed with: enough context for merges and leading spaces to decode as
# they would in a full decode (vLLM uses the same numbers).
PROMPT_CONTEXT_TOKENS = 7
PREFIX_WINDOW = 5
REPLACEMENT_CHAR = "\ufffd"


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids a full decode with skip_special_tokens drops: the named special tokens and added tokens marked special.

    `all_special_ids` alone is not enough for real checkpoints: configs that name only bos/eos (Llama 3's reserved
    and header tokens, for one) leave special added tokens out of it, yet the fast tokenizer's own decode drops them.
    """
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False))
    return frozenset(ids)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without re-decoding the whole sequence."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        context = prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
        self.tokens: list[str] = self._to_tokens(context)
        self.prefix_offset = max(len(self.tokens) - PREFIX_WINDOW, 0)
        self.read_offset = len(self.tokens)

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        kept = [i for i in token_ids if i not in self.skip_ids]
        return [t for t in self.tokenizer.convert_ids_to_tokens(kept) if t is not None] if kept else []

    def _window_text(self) -> tuple[str, str]:
        convert = self.tokenizer.convert_tokens_to_string
        prefix_text = convert(self.tokens[self.prefix_offset : self.read_offset])
        new_text = convert(self.tokens[self.prefix_offset :])
        return prefix_text, new_text

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty while a character is incomplete)."""
        new_tokens = self._to_tokens([token_id])
        if not new_tokens:
            return ""
        self.tokens.extend(new_tokens)
        prefix_text, new_text = self._window_text()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the tokens that complete it
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the sequence, return any held-back text (incomplete bytes decode as U+FFFD)."""
        if self.read_offset >= len(self.tokens):
            return ""
        prefix_text, new_text = self._window_text()
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new_text[len(prefix_text) :]


class TextStream:
    """The output text of one sequence: detokenization, stop strings and what may be sent so far."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop = [s for s in stop or [] if s]
        self.include_stop = include_stop_str_in_output
        self.text = ""
        self.sent = 0  # chars of `text` already handed out by `delta`
        self.stop_reason: str | None = None  # the stop string that ended the sequence

    @property
    def stopped(self) -> bool:
        """True once a stop string was found (the text is final)."""
        return self.stop_reason is not None

    def add(self, token_id: int) -> bool:
        """Append one token's text; return True if it completed a stop string (the text is then truncated)."""
        if self.stopped:
            return True
        return self._append(self.detokenizer.add(token_id))

    def finish(self) -> None:
        """The sequence ended: take in any held-back partial character."""
        if not self.stopped:
            self._append(self.detokenizer.flush())

    def _append(self, new_text: str) -> bool:
        if not new_text:
            return False
        start = max(len(self.text) - max((len(s) for s in self.stop), default=0) + 1, 0)
        self.text += new_text
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) != -1]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[: index + len(stop) if self.include_stop else index]
        self.stop_reason = stop
        return True

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for length in range(min(max((len(s) for s in self.stop), default=1) - 1, len(self.text)), 0, -1):
            suffix = self.text[-length:]
            if any(s.startswith(suffix) for s in self.stop):
                return length
        return 0

    def delta(self, final: bool) -> str:
        """Text that can be sent now; with `final` (or after a stop string) everything that is left."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out
