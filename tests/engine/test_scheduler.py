"""Scheduler policy without a model: token budgets, chunking, max_num_seqs, preemption order, stopping rules."""

from __future__ import annotations

import zlib

from pypto_serving.engine.block_manager import BlockManager
from pypto_serving.engine.sampling_params import SamplingParams
from pypto_serving.engine.scheduler import ScheduledBatch, Scheduler
from pypto_serving.engine.sequence import Sequence, SequenceStatus

EOS = 0


def make(num_blocks: int = 64, block_size: int = 4, budget: int = 64, max_seqs: int = 16, max_len: int = 1000,
         threshold: int = 0, caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_seqs, budget, max_len, threshold)


def add(s: Scheduler, name: str, prompt_len: int, **params) -> Sequence:
    # a stable per-name prompt (str hash() is salted per process, so two names could share a cached prefix)
    seq = Sequence(name, [100 + (zlib.crc32(name.encode()) + i) % 50 for i in range(prompt_len)],
                   SamplingParams(**{"max_tokens": 100, **params}), eos_token_ids={EOS})
    s.add(seq)
    return seq


def run_step(s: Scheduler, token: int = 7) -> tuple[ScheduledBatch, list[Sequence]]:
    """One step where every sequence that completes its tokens samples ``token``."""
    batch = s.schedule()
    sampled = {i: token for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True))
               if seq.num_computed_tokens + n == seq.num_tokens}
    return batch, s.postprocess(batch, sampled)


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)]


def test_token_budget_running_first_then_waiting_with_chunking() -> None:
    s = make(budget=16)
    for name in "abc":
        add(s, name, 10)
    batch, _ = run_step(s)
    assert plan(batch) == [("a", 10), ("b", 6)]  # c does not fit the budget this step
    batch, _ = run_step(s)
    assert plan(batch) == [("a", 1), ("b", 4), ("c", 10)]  # decode, rest of b's prompt, then c
    batch, _ = run_step(s)
    assert plan(batch) == [("a", 1), ("b", 1), ("c", 1)]


def test_long_prefill_threshold_caps_each_chunk() -> None:
    s = make(budget=100, threshold=8)
    add(s, "a", 20)
    add(s, "b", 5)
    assert plan(run_step(s)[0]) == [("a", 8), ("b", 5)]
    assert plan(run_step(s)[0]) == [("a", 8), ("b", 1)]
    assert plan(run_step(s)[0]) == [("a", 4), ("b", 1)]
    assert plan(run_step(s)[0]) == [("a", 1), ("b", 1)]


def test_max_num_seqs_bounds_the_running_set() -> None:
    s = make(max_seqs=2)
    for name in "abcd":
        add(s, name, 3)
    assert [seq.request_id for seq in run_step(s)[0].seqs] == ["a", "b"]
    assert len(s.running) == 2 and [q.request_id for q in s.waiting] == ["c", "d"]


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    # 6 blocks of 4 tokens; three prompts of 8 tokens fill the pool
    s = make(num_blocks=6, block_size=4, caching=False)
    a = add(s, "a", 8, max_tokens=6)
    add(s, "b", 8)
    c = add(s, "c", 8)
    assert plan(run_step(s)[0]) == [("a", 8), ("b", 8), ("c", 8)]
    batch, _ = run_step(s)  # a needs a third block: c, the newest, is preempted
    assert batch.num_preempted == 1 and plan(batch) == [("a", 1), ("b", 1)]
    assert list(s.waiting) == [c] and c.status is SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0 and c.num_tokens == 9  # its token is kept
    for _ in range(3):
        assert run_step(s)[0].num_preempted == 0
    batch, done = run_step(s)  # a needs a fourth block: b is now the newest running
    assert batch.num_preempted == 1 and plan(batch) == [("a", 1)] and done == [a]
    assert [q.request_id for q in s.waiting] == ["b", "c"] and s.num_preemptions == 2
    # b (preempted last) is recomputed first: its prompt and its 5 generated tokens
    assert plan(run_step(s)[0]) == [("b", 13)]


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    s = make(num_blocks=2, block_size=4, caching=False)
    a = add(s, "a", 8)
    assert plan(run_step(s)[0]) == [("a", 8)]
    batch, _ = run_step(s)  # a needs a third block that does not exist
    assert batch.num_preempted == 1 and plan(batch) == [] and s.waiting[0] is a


def test_stop_tokens_min_tokens_max_tokens_and_max_model_len() -> None:
    s = make(max_len=12)
    eos = add(s, "eos", 4)
    held = add(s, "held", 4, min_tokens=2)  # EOS may end it from its third token on
    ignored = add(s, "ignored", 4, ignore_eos=True, max_tokens=3)
    stop = add(s, "stop", 4, ignore_eos=True, stop_token_ids=[9], max_tokens=5)
    long = add(s, "long", 9, ignore_eos=True)  # max_tokens 100, but only 3 tokens fit max_model_len
    _, done = run_step(s, token=EOS)
    assert [q.request_id for q in done] == ["eos"] and eos.finish_reason == "stop" and eos.output_token_ids == [EOS]
    assert run_step(s, token=EOS)[1] == []
    _, done = run_step(s, token=EOS)
    assert {q.request_id: q.finish_reason for q in done} == {"held": "stop", "ignored": "length", "long": "length"}
    assert held.num_output_tokens == 3 and ignored.output_token_ids == [EOS] * 3 and long.num_tokens == 12
    _, done = run_step(s, token=9)
    assert done == [stop] and stop.finish_reason == "stop" and stop.output_token_ids == [EOS, EOS, EOS, 9]
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 64


def test_finish_releases_waiting_and_running_sequences() -> None:
    s = make(budget=8)
    a, b = add(s, "a", 8), add(s, "b", 8)
    run_step(s)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    s.finish(a, "abort")
    s.finish(b, "abort")
    s.finish(b, "abort")  # idempotent
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 64
    assert a.finish_reason == b.finish_reason == "abort"


def test_prefix_hits_are_counted_at_admission() -> None:
    s = make(block_size=4)
    first = add(s, "a", 10)
    run_step(s)
    s.finish(first)
    again = Sequence("b", [*first.token_ids[:10], 1, 2], SamplingParams(), eos_token_ids={EOS})
    s.add(again)
    batch, _ = run_step(s)
    assert plan(batch) == [("b", 4)] and again.num_cached_tokens == 8
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (10 + 12, 8)


# ---------------------------------------------------------------- micro-batches (pipeline parallelism)


def finish_step(s: Scheduler, batch: ScheduledBatch, token: int = 7) -> list[Sequence]:
    sampled = {i: token for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True))
               if seq.num_computed_tokens + n == seq.num_tokens}
    return s.postprocess(batch, sampled)


def test_micro_batches_share_the_sequences_and_never_schedule_one_twice() -> None:
    s = make(budget=64)
    for name in "abcde":
        add(s, name, 3)
    first = s.schedule(micro_batches=2)
    assert [q.request_id for q in first.seqs] == ["a", "b", "c"]  # ceil(5 / 2): the other slot gets a share
    assert all(q.in_flight for q in first.seqs)
    second = s.schedule(micro_batches=2)
    assert [q.request_id for q in second.seqs] == ["d", "e"]
    assert not s.schedule(micro_batches=2)  # everything is in flight
    finish_step(s, first)
    assert not any(q.in_flight for q in first.seqs)
    third = s.schedule(micro_batches=2)
    assert plan(third) == [("a", 1), ("b", 1), ("c", 1)]  # back from the pipeline: decodes; d, e still out


def test_micro_batches_share_the_token_budget() -> None:
    s = make(budget=64, num_blocks=128)
    add(s, "a", 100)
    add(s, "b", 100)
    first = s.schedule(micro_batches=2)
    assert plan(first) == [("a", 32)]  # ceil(64 / 2): the pipeline holds one step's budget in flight
    second = s.schedule(micro_batches=3)
    assert plan(second) == [("b", 22)]  # ceil(64 / 3)
    finish_step(s, first)
    assert plan(s.schedule()) == [("a", 64)]  # one batch in flight: the whole budget


def test_a_sequence_finished_in_flight_keeps_its_blocks_until_its_batch_returns() -> None:
    s = make(num_blocks=8)
    a = add(s, "a", 8)
    batch = s.schedule(micro_batches=2)
    s.finish(a, "abort")  # aborted while its micro-batch runs
    assert a.status is SequenceStatus.FINISHED and a not in s.running
    assert s.block_manager.num_free_blocks == 6  # still held: a stage may write its K/V
    assert finish_step(s, batch) == []  # no token for an aborted sequence
    assert s.block_manager.num_free_blocks == 8 and not a.in_flight


def test_preemption_never_takes_a_sequence_in_flight_nor_an_older_one() -> None:
    s = make(num_blocks=6, block_size=4, caching=False)
    a, b, c = add(s, "a", 8), add(s, "b", 8), add(s, "c", 8)
    finish_step(s, s.schedule())  # the pool is full
    for seq in (a, b, c):
        seq.token_ids += [7, 7, 7]  # each needs a third block
    first = s.schedule(micro_batches=3)  # a: its block comes from preempting c, the newest
    assert plan(first) == [("a", 4)] and first.num_preempted == 1 and list(s.waiting) == [c]
    second = s.schedule(micro_batches=3)  # b takes the last free block
    assert plan(second) == [("b", 4)] and s.block_manager.num_free_blocks == 0
    finish_step(s, first)  # a is back and needs a fourth block; b, the newest, is in flight: a waits for it
    third = s.schedule(micro_batches=3)
    assert plan(third) == [] and third.num_preempted == 0 and a.block_table and b.in_flight
    finish_step(s, second)  # b is back: now a takes b's blocks
    fourth = s.schedule(micro_batches=3)
    assert plan(fourth) == [("a", 1)] and fourth.num_preempted == 1 and [q.request_id for q in s.waiting] == ["b", "c"]
