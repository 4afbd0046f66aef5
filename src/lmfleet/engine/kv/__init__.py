"""The paged KV cache bookkeeping: which blocks each request owns, which full blocks
hold which token prefix. Pure Python, no torch: the runner owns the tensors."""

from __future__ import annotations

from lmfleet.engine.kv.block_pool import BlockPool, KVBlock
from lmfleet.engine.kv.manager import KVCacheManager, PrefixCacheStats

__all__ = ["BlockPool", "KVBlock", "KVCacheManager", "PrefixCacheStats"]
