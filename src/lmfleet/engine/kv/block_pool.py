"""A fixed pool of KV blocks with reference counts and a prefix-cache index.

A block is *free* when no request references it (``ref_cnt == 0``). Free blocks
wait in an LRU queue; a free block may still hold a cached prefix, and stays
findable by its hash until the pool hands it out again (eviction happens only on
reuse). Taking a cached block (a prefix hit) removes it from the free queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    #: chained hash of this block's tokens when it is full and registered; else None
    block_hash: int | None = None
    #: what the hash was computed from, to rule out collisions on lookup
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockPool:
    """``num_blocks`` blocks, handed out and returned by id."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # LRU order: the first key is evicted first. Values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by at least one request."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(
        self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> int | None:
        """The id of a cached block holding exactly these tokens after this parent."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None  # a hash collision: treat as a miss
        return block_id

    # ---- transitions ---------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (least recently freed first), or None if too few."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def take(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block (a prefix-cache hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; unreferenced blocks join the LRU tail
        in the given order (pass a request's blocks tail first, so its last blocks
        are evicted before the shared prefix)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def register(
        self, block_id: int, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> None:
        """Record that a full block holds these tokens, so later requests can hit it.
        If another block already holds the same prefix, the first one stays indexed."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix held by a free block; returns how many."""
        dropped = 0
        for block_id in list(self._free):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
                dropped += 1
        return dropped

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = ()

    def check_invariants(self) -> None:
        """Raise if the pool's bookkeeping is inconsistent (used by tests)."""
        for block in self.blocks:
            in_free = block.block_id in self._free
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} has ref_cnt {block.ref_cnt}")
            if in_free != (block.ref_cnt == 0):
                raise RuntimeError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt}, free={in_free}"
                )
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise RuntimeError(f"cache index points at block {block_id} with another hash")
