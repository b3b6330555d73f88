"""A request's state inside the engine: its tokens, how many have KV computed, and its blocks."""

from __future__ import annotations

import enum

from pypto_serving.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued (also after preemption), scheduled, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + generated tokens of one request. ``num_computed_tokens`` of them have their K/V in the pool."""

    __slots__ = ("block_hashes", "block_table", "finish_reason", "in_flight", "num_cached_tokens",
                 "num_computed_tokens", "num_prompt_tokens", "params", "request_id", "status", "stop_ids", "token_ids")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int]) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first admission (-1: not yet)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full blocks, for prefix caching
        self.finish_reason: str | None = None
        self.in_flight = False  # part of a micro-batch that has not come back yet (at most one)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens:]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
