"""The KV block pool: allocation with reference counts, and prefix caching of full blocks.

A full block (``block_size`` tokens whose K/V are computed) is registered under a chained hash of its parent
block's hash and its token ids. A new sequence reuses the longest chain of registered blocks matching its prompt
(never the block of its last prompt token, which is always recomputed to produce logits); a hit must also match
the stored parent hash and token ids, so a hash collision can never serve wrong K/V. Freed blocks that are
registered stay in an LRU queue and keep their contents until the pool needs them back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pypto_serving.engine.sequence import Sequence


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given its parent's hash (None for the first block) and its tokens."""
    return hash((parent, token_ids))


class Block:
    """One block of the pool; ``hash``/``token_ids``/``parent`` are set while it is registered in the cache."""

    __slots__ = ("block_id", "hash", "parent", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.parent: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Hands out blocks to sequences, shares cached prefix blocks, evicts cached free blocks in LRU order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: Callable[[int | None, tuple[int, ...]], int] = chain_hash) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: 0, 1, 2, ...
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # registered and unused, oldest first
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        """Size of the pool."""
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses (including cached ones that can be evicted)."""
        return len(self.free_uncached) + len(self.free_cached)

    def usage(self) -> float:
        """Fraction of the pool held by sequences (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks covering ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- prefix cache lookup and admission

    def find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(block ids, hashes) of the longest cached chain of full blocks, excluding the last token's block."""
        if not self.enable_prefix_caching:
            return [], []
        bs, ids, hashes, parent = self.block_size, [], [], None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.hash_fn(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent != parent or block.token_ids != tokens:  # a hash collision: not our prefix
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def can_admit(self, cached_blocks: list[int], num_tokens: int) -> bool:
        """Whether a new sequence reusing ``cached_blocks`` can get blocks for its first ``num_tokens`` tokens."""
        reused_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        new = self.blocks_needed(num_tokens) - len(cached_blocks)
        return new + reused_free <= self.num_free_blocks

    def admit(self, seq: Sequence, cached_blocks: list[int], hashes: list[int], num_tokens: int) -> None:
        """Give ``seq`` the cached blocks (shared) plus fresh blocks for its first ``num_tokens`` tokens."""
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
        seq.block_table = list(cached_blocks)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        self.grow(seq, num_tokens)

    # ---------------------------------------------------------------- growth, registration, release

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens with the free blocks left."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks until ``seq``'s table covers ``num_tokens`` tokens (check `can_grow` first)."""
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.pop()
        else:  # evict the least recently used cached block
            block_id, _ = self.free_cached.popitem(last=False)
            block = self.blocks[block_id]
            del self.cached[block.hash]
            block.hash, block.parent, block.token_ids = None, None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that became full and computed (their K/V are final) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.hash_fn(parent, tokens)
            seq.block_hashes.append(h)
            if h not in self.cached:  # else an identical (or colliding) block is already registered: keep it
                block = self.blocks[seq.block_table[i]]
                block.hash, block.parent, block.token_ids = h, parent, tokens
                self.cached[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; registered ones stay cached (tail blocks are evicted first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free_uncached.append(block_id)
                else:
                    self.free_cached[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
