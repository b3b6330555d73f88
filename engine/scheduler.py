"""Token-budget continuous batching with chunked prefill and preemption by recompute.

Every step gets ``max_num_batched_tokens`` tokens. Running sequences go first, in admission order: a decode
takes one token, an unfinished prefill takes the next chunk (capped by ``long_prefill_token_threshold``). When
the pool has no block for a running sequence, the newest running sequence is preempted: its blocks are freed
(registered ones stay in the prefix cache) and it goes back to the front of the queue, to be recomputed later.
Then, if nothing was preempted, waiting sequences are admitted in arrival order while the budget, ``max_num_seqs``
and the pool allow, reusing cached prefix blocks. After the step, `postprocess` advances the sequences, registers
newly full blocks, appends sampled tokens and finishes sequences (stop token, max_tokens, max_model_len).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pypto_serving.engine.block_manager import BlockManager
from pypto_serving.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each computes (``num_tokens[i]`` for ``seqs[i]``)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Owns the waiting queue, the running list and the block pool; decides each step's batch."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, long_prefill_token_threshold: int = 0) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits = 0  # of which found in the cache

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def _chunk(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.long_prefill_token_threshold:
            n = min(n, self.long_prefill_token_threshold)
        return n

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences and token counts, allocating their blocks (preempting if needed)."""
        bm, batch = self.block_manager, ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                bm.grow(seq, seq.num_computed_tokens + n)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.num_preempted:
            seq = self.waiting[0]
            cached, hashes = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = self._chunk(seq.num_tokens - num_cached, budget)
            if not bm.can_admit(cached, num_cached + n):
                break
            self.waiting.popleft()
            bm.admit(seq, cached, hashes, num_cached + n)
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the batch after a successful step; ``sampled`` maps batch index -> new token.

        Returns the sequences that finished (already released from the pool and the running list).
        """
        finished = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            if seq.status is not SequenceStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            token = sampled.get(i)
            if token is None:
                continue
            seq.token_ids.append(token)
            params = seq.params
            if token in seq.stop_ids and seq.num_output_tokens > params.min_tokens:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.finish(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Drop ``seq`` from the queues and release its blocks (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if reason is not None:
            seq.finish_reason = reason
