"""Block pool: chained prefix hashes, the collision guard, LRU eviction of cached blocks, reference counts."""

from __future__ import annotations

from pypto_serving.engine.block_manager import BlockManager, chain_hash
from pypto_serving.engine.sampling_params import SamplingParams
from pypto_serving.engine.sequence import Sequence


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), eos_token_ids={0})


def run_prefill(bm: BlockManager, s: Sequence) -> list[int]:
    """Admit ``s`` with whatever the cache has, 'compute' its whole prompt, register its full blocks."""
    cached, hashes = bm.find_cached_prefix(s)
    assert bm.can_admit(cached, s.num_tokens)
    bm.admit(s, cached, hashes, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)
    return cached


def test_hashes_chain_over_the_parent() -> None:
    a, b = chain_hash(None, (1, 2)), chain_hash(None, (3, 4))
    assert chain_hash(a, (5, 6)) != chain_hash(b, (5, 6))  # same tokens, different prefix
    assert chain_hash(a, (5, 6)) == chain_hash(chain_hash(None, (1, 2)), (5, 6))


def test_shared_prefix_is_reused_and_refcounted() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(1, 11)), "a")  # 2 full blocks + 2 tokens
    assert run_prefill(bm, a) == []
    assert len(a.block_table) == 3 and len(bm.cached) == 2
    b = seq([*range(1, 9), 50, 51, 52], "b")  # same first two blocks
    hit = run_prefill(bm, b)
    assert hit == a.block_table[:2] and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert b.block_table[2] not in a.block_table
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage() == 0.0
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_the_last_prompt_token_is_always_recomputed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, seq(list(range(1, 9)), "a"))  # exactly two full blocks
    again = seq(list(range(1, 9)), "b")
    cached, _ = bm.find_cached_prefix(again)
    assert len(cached) == 1  # the second block holds the last token: not served from the cache
    longer = seq(list(range(1, 10)), "c")
    assert len(bm.find_cached_prefix(longer)[0]) == 2


def test_prefix_must_match_from_the_first_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    assert bm.find_cached_prefix(seq([9, 9, 3, 4, 5], "b"))[0] == []  # second block alone is not a prefix
    assert len(bm.find_cached_prefix(seq([1, 2, 3, 9, 5], "c"))[0]) == 1


def test_collision_guard_rejects_a_block_with_other_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, hash_fn=lambda parent, tokens: 42)  # everything collides
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    assert len(bm.cached) == 1  # second block collided with the first: not registered twice
    assert bm.find_cached_prefix(seq([7, 8, 3, 4, 5], "b"))[0] == []
    assert bm.find_cached_prefix(seq([1, 2, 7, 8, 5], "c"))[0] == [a.block_table[0]]


def test_lru_eviction_of_cached_free_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 2, 3], "a"), seq([5, 6, 7], "b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)  # both full blocks cached; a's is the least recently used
    assert len(bm.cached) == 2 and bm.num_free_blocks == 4
    # a new sequence needing 3 blocks takes the 2 uncached blocks first, then evicts a's cached block
    c = seq([9, 9, 9, 9, 9], "c")
    run_prefill(bm, c)
    assert a_full in c.block_table and b_full not in c.block_table
    assert bm.find_cached_prefix(seq([1, 2, 3], "a2"))[0] == []
    assert bm.find_cached_prefix(seq([5, 6, 7], "b2"))[0] == [b_full]


def test_reusing_a_cached_block_refreshes_it() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 2, 3], "a"), seq([5, 6, 7], "b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)  # LRU order: a's block, then b's
    a2 = seq([1, 2, 4], "a2")
    assert run_prefill(bm, a2) == [a_full]
    bm.free(a2)  # a's block is now the most recently used
    run_prefill(bm, seq([8, 8, 8, 8, 8], "c"))  # two uncached blocks plus one eviction
    assert a_full in bm.cached.values() and b_full not in bm.cached.values()


def test_can_admit_counts_cached_free_blocks_it_reuses() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    run_prefill(bm, a)
    bm.free(a)
    b = seq([1, 2, 3, 4, 6, 7, 8], "b")  # hits 2 cached free blocks, needs 2 more: 4 > 3
    cached, _ = bm.find_cached_prefix(b)
    assert len(cached) == 2
    assert not bm.can_admit(cached, b.num_tokens)
    assert bm.can_admit(cached, 6)


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    run_prefill(bm, seq([1, 2, 3, 4, 5], "a"))
    assert bm.cached == {} and bm.find_cached_prefix(seq([1, 2, 3, 4, 5], "b"))[0] == []
