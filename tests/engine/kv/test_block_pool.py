from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmfleet.engine.kv import BlockPool, KVCacheManager
from lmfleet.engine.request import Request, SamplingParams


def test_allocate_free_lru_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert a == [0, 1] and b == [2, 3]
    assert pool.allocate(1) is None
    pool.free([1, 0])
    pool.free([3])
    # least recently freed first
    assert pool.allocate(3) == [1, 0, 3]
    pool.check_invariants()


def test_double_free_raises():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids)


def test_cached_free_block_is_found_until_reused():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.register(b, 123, None, (1, 2))
    pool.free([b])
    assert pool.lookup(123, None, (1, 2)) == b
    pool.take([b])  # a hit pulls it out of the free queue
    assert pool.num_free_blocks == 1
    pool.free([b])
    pool.allocate(2)  # reuse evicts
    assert pool.lookup(123, None, (1, 2)) is None
    pool.check_invariants()


def test_hash_collision_is_a_miss():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.register(b, 7, None, (1, 2))
    assert pool.lookup(7, None, (1, 3)) is None  # same hash, other tokens
    assert pool.lookup(7, 5, (1, 2)) is None  # same hash, other parent


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1))


def test_prefix_hit_counts_and_sharing():
    kv = KVCacheManager(16, 4)
    a = _req("a", list(range(10)))
    assert kv.get_computed_blocks(a) == ([], 0)
    blocks_a = kv.allocate_slots(a, 10)
    assert len(blocks_a) == 3
    b = _req("b", [*range(8), 99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert hits == blocks_a[:2] and n == 8
    b.num_computed_tokens = n
    blocks_b = kv.allocate_slots(b, 3, hits)
    assert blocks_b[:2] == blocks_a[:2] and blocks_b[2] != blocks_a[2]
    assert kv.pool.blocks[blocks_a[0]].ref_cnt == 2
    assert kv.stats.queries == 21 and kv.stats.hits == 8
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16
    kv.pool.check_invariants()


def test_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(8, 4)
    a = _req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    again = _req("a2", list(range(8)))
    hits, n = kv.get_computed_blocks(again)
    assert n == 4  # not 8: the last token's logits must be computed
    assert len(hits) == 1


def test_allocate_returns_none_and_changes_nothing():
    kv = KVCacheManager(3, 4)
    a = _req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None
    b = _req("b", [50, 51])
    assert kv.allocate_slots(b, 2) is None
    assert kv.num_free_blocks == 0
    assert kv.block_ids("b") == []


def test_hits_in_free_queue_count_against_free_blocks():
    kv = KVCacheManager(3, 4)
    a = _req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)  # both blocks cached and free
    b = _req("b", [*range(8), 1, 2, 3, 4, 5])  # hits 2 blocks, needs 2 more; only 1 free
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    b.num_computed_tokens = n
    assert kv.allocate_slots(b, 5, hits) is None
    kv.pool.check_invariants()
    assert kv.num_free_blocks == 3


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / hit / free sequences through the manager keep the pool
    consistent: no leak, no double free, reference counts equal owners."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(12, 2)
        self.live: dict[str, Request] = {}
        self.n = 0
        self.expected_hits = 0
        self.expected_queries = 0

    @rule(prefix=st.integers(0, 2), length=st.integers(1, 9))
    def add(self, prefix, length):
        tokens = [prefix] * 4 + [100 + self.n + i for i in range(length)]
        r = _req(f"r{self.n}", tokens)
        self.n += 1
        hits, n = self.kv.get_computed_blocks(r)
        self.expected_queries += len(tokens)
        self.expected_hits += n
        r.num_computed_tokens = n
        if self.kv.allocate_slots(r, len(tokens) - n, hits) is not None:
            self.live[r.request_id] = r

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(self.live.pop(rid))

    @invariant()
    def consistent(self):
        pool = self.kv.pool
        pool.check_invariants()
        owners = [0] * pool.num_blocks
        for rid in self.live:
            for b in self.kv.block_ids(rid):
                owners[b] += 1
        assert owners == [blk.ref_cnt for blk in pool.blocks]
        assert pool.num_free_blocks == sum(1 for c in owners if c == 0)
        assert self.kv.stats.hits == self.expected_hits
        assert self.kv.stats.queries == self.expected_queries

    def teardown(self):
        for r in list(self.live.values()):
            self.kv.free(r)
        assert self.kv.num_free_blocks == self.kv.num_blocks


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
@settings(max_examples=50, deadline=None)
def test_identical_prompts_always_hit_after_first(tokens):
    kv = KVCacheManager(64, 2)
    a = _req("a", tokens)
    kv.allocate_slots(a, len(tokens))
    b = _req("b", tokens)
    hits, n = kv.get_computed_blocks(b)
    assert n == ((len(tokens) - 1) // 2) * 2
    assert hits == kv.block_ids("a")[: len(hits)]


def test_token_ids_between_spans_prompt_and_outputs():
    r = Request("t", [1, 2, 3, 4], SamplingParams())
    r.output_token_ids += [5, 6, 7]
    full = r.all_token_ids
    for start in range(8):
        for end in range(start, 8):
            assert r.token_ids_between(start, end) == full[start:end]


def test_decode_in_a_block_with_room_reuses_the_list_and_registers_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = Request("d", [1, 2, 3], SamplingParams())
    blocks = kv.allocate_slots(r, 3)
    assert blocks is not None and len(blocks) == 1
    r.num_computed_tokens = 3
    r.output_token_ids.append(9)
    # the fourth token fits the first block: same list, no new block, block now indexed
    assert kv.allocate_slots(r, 1) is blocks and len(blocks) == 1
    assert kv.pool.num_cached_blocks == 1
    r.num_computed_tokens = 4
    r.output_token_ids.append(8)
    assert len(kv.allocate_slots(r, 1)) == 2
