"""The KV cache manager: blocks per request and prefix caching by chained hashes.

Block ``i`` of a sequence is identified by ``hash((hash of block i-1, its tokens,
extra key))``, so a hit on block ``i`` implies the whole prefix matches. Only full
blocks are cached. The scheduler asks for blocks with :meth:`allocate_slots`; when
too few are free it gets ``None`` back and decides whom to preempt.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from lmfleet.engine.kv.block_pool import BlockPool
from lmfleet.engine.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted in tokens, as vLLM's ``prefix_cache_queries`` / ``_hits`` are."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        extra_key: Hashable = None,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.extra_key = extra_key  # e.g. model version or adapter id
        self.stats = PrefixCacheStats()
        self._blocks: dict[str, list[int]] = {}  # request id -> block ids, in order
        self._num_registered: dict[str, int] = {}  # request id -> blocks indexed so far

    # ---- queries -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    # ---- prefix cache --------------------------------------------------------------
    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend ``request.block_hashes`` to cover the full blocks of its first
        ``num_tokens`` tokens."""
        hashes = request.block_hashes
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else None
            tokens = request.token_ids_between(i * bs, (i + 1) * bs)
            hashes.append(hash((parent, tuple(tokens), self.extra_key)))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks holding a prefix of this request, and how many tokens
        they cover. Does not take references; :meth:`allocate_slots` does."""
        if not self.enable_prefix_caching:
            return [], 0
        # Always leave at least one token to compute: its logits are needed.
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_hit_blocks * self.block_size)
        hits: list[int] = []
        bs = self.block_size
        parent = None
        for i in range(max_hit_blocks):
            block_hash = request.block_hashes[i]
            tokens = request.token_ids_between(i * bs, (i + 1) * bs)
            block_id = self.pool.lookup(block_hash, parent, tokens)
            if block_id is None:
                break
            hits.append(block_id)
            parent = block_hash
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * bs
        return hits, len(hits) * bs

    # ---- allocation ----------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[int] | None = None,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request`` after its
        ``num_computed_tokens`` (which already counts ``new_computed_blocks``).
        Returns the request's full block list, or None when blocks run out (nothing
        changes then)."""
        owned = self._blocks.get(request.request_id, [])
        total = request.num_computed_tokens + num_new_tokens
        if not new_computed_blocks and total <= len(owned) * self.block_size:
            # the common decode step: the last block still has room
            if self.enable_prefix_caching:
                self._register_full_blocks(request, total)
            return owned
        new_computed_blocks = new_computed_blocks or []
        num_new = self.blocks_needed(total) - len(owned) - len(new_computed_blocks)
        num_new = max(num_new, 0)
        # Cached hits that sit in the free queue are no longer free once taken.
        evictable_hits = sum(1 for b in new_computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - evictable_hits:
            return None
        self.pool.take(new_computed_blocks)
        fresh = self.pool.allocate(num_new) if num_new else []
        if fresh is None:  # unreachable after the check above
            raise RuntimeError("KV block accounting is inconsistent")
        if request.request_id not in self._blocks:
            self._blocks[request.request_id] = owned
            self._num_registered[request.request_id] = len(new_computed_blocks)
        owned.extend(new_computed_blocks)
        owned.extend(fresh)
        if self.enable_prefix_caching:
            self._register_full_blocks(request, total)
        return owned

    def register_known(self, request: Request) -> None:
        """Index the request's computed blocks that became full of known tokens since
        they were allocated: with async scheduling a block whose last token was still
        in flight at allocation waits for that token (a no-op without prefix caching
        or for a request that holds no blocks, e.g. preempted)."""
        if self.enable_prefix_caching and request.request_id in self._blocks:
            self._register_full_blocks(request, request.num_computed_tokens)

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the blocks that will be full once ``num_tokens`` are computed."""
        rid = request.request_id
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        done = self._num_registered[rid]
        if num_full <= done:
            return
        self._update_hashes(request, num_full * self.block_size)
        owned = self._blocks[rid]
        bs = self.block_size
        for i in range(done, num_full):
            parent = request.block_hashes[i - 1] if i else None
            tokens = request.token_ids_between(i * bs, (i + 1) * bs)
            self.pool.register(owned[i], request.block_hashes[i], parent, tokens)
        self._num_registered[rid] = num_full

    def free(self, request: Request) -> None:
        """Return all of a request's blocks, tail first."""
        owned = self._blocks.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if owned:
            self.pool.free(reversed(owned))

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()
