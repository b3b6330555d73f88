"""Token-budget continuous batching with chunked prefill and preemption by recompute.

Every step gets ``max_num_batched_tokens`` tokens. Running sequences go first, in admission order: a decode
takes one token, an unfinished prefill takes the next chunk (capped by ``long_prefill_token_threshold``). When
the pool has no block for a running sequence, the newest running sequence is preempted: its blocks are freed
(registered ones stay in the prefix cache) and it goes back to the front of the queue, to be recomputed later.
Then, if nothing was preempted, waiting sequences are admitted in arrival order while the budget, ``max_num_seqs``
and the pool allow, reusing cached prefix blocks. After the step, `postprocess` advances the sequences, registers
newly full blocks, appends sampled tokens and finishes sequences (stop token, max_tokens, max_model_len).

Micro-batches: several batches may be in flight (pipeline parallelism). A scheduled sequence is ``in_flight``
until its batch comes back (`postprocess` or `retire`); the next batch takes only sequences not in flight, and at
most ``ceil(unfinished / micro_batches)`` of them so every in-flight slot gets a share. The token budget is shared
the same way: each micro-batch gets ``ceil(max_num_batched_tokens / micro_batches)`` tokens, so the pipeline holds
as many tokens in flight as one step without it, and a stage waits for its first micro-batch only that long.
Sequences in flight are never preempted: when the newest running sequence is in flight, a sequence that needs a
block waits for it to come back (older sequences keep their priority, so preemption cannot livelock). One finished
(aborted, failed) while in flight keeps its blocks until its batch comes back, so no block is reused while a stage
may still write its K/V.
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

    def schedule(self, micro_batches: int = 1) -> ScheduledBatch:
        """Pick the next batch's sequences (not in flight) and token counts, allocating their blocks (preempting if
        needed); ``micro_batches``: how many batches share the unfinished sequences. Marks them in flight."""
        bm, batch = self.block_manager, ScheduledBatch()
        budget = -(-self.max_num_batched_tokens // micro_batches)
        cap = -(-(len(self.running) + len(self.waiting)) // micro_batches)
        for seq in list(self.running):
            if budget <= 0 or len(batch.seqs) >= cap:
                break
            if seq.in_flight or seq.status is not SequenceStatus.RUNNING:  # in flight, or preempted just now
                continue
            n = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                if self.running[-1].in_flight:  # the newest is in flight: wait for it rather than take an older one
                    break
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                bm.grow(seq, seq.num_computed_tokens + n)
                seq.in_flight = True
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                continue
            break  # no room for this sequence: later ones wait for the pool too
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.num_preempted
               and len(batch.seqs) < cap):
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
            seq.in_flight = True
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
        self.retire(batch)
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

    def retire(self, batch: ScheduledBatch) -> None:
        """``batch`` came back (done or failed): its sequences may be scheduled again, and those finished while it
        was in flight release their blocks now."""
        for seq in batch.seqs:
            seq.in_flight = False
            if seq.status is SequenceStatus.FINISHED:
                self.block_manager.free(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Drop ``seq`` from the queues and release its blocks (at once, or when its in-flight batch comes back;
        idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if not seq.in_flight:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if reason is not None:
            seq.finish_reason = reason
