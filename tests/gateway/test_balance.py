"""Balancing across replicas: caps, rotation, power of two choices, prefix affinity,
the llm-d style weighted scorers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmfleet.errors import ConfigError
from lmfleet.gateway.policies.balance import (
    BALANCERS,
    KVAware,
    PrefixAffinity,
    PrefixIndex,
    ReplicaView,
    RouteRequest,
    load,
    make_balancer,
    prefix_hashes,
)

SYSTEM_A = "You are a terse assistant for the billing team. " * 20  # ~1 kB
SYSTEM_B = "You answer questions about the travel policy only. " * 20
NO_PREFIX = RouteRequest(())


def rv(rid: str, inflight: int = 0, **kw) -> ReplicaView:
    return ReplicaView(rid, f"http://{rid}:8000", inflight, **kw)


def req(text: str) -> RouteRequest:
    return RouteRequest(prefix_hashes(text))


# -- prefix hashes -----------------------------------------------------------------------


def test_prefix_hashes_are_chained_over_full_chunks():
    a = prefix_hashes("x" * 1000 + "tail one", chunk_chars=256)
    b = prefix_hashes("x" * 512 + "y" * 600, chunk_chars=256)
    assert len(a) == 3  # 1008 chars: three full chunks, the partial fourth is left out
    assert a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes("x" * 255) == ()
    assert len(prefix_hashes("x" * 10_000, chunk_chars=10, max_chunks=5)) == 5
    # chained: the same chunk at another depth hashes differently
    assert len(set(prefix_hashes("x" * 1024, chunk_chars=256))) == 4


def test_prefix_hashes_are_stable_values():
    # pinned: every gateway process and machine must agree (Python's hash() would not)
    assert prefix_hashes("abcdefgh", chunk_chars=4) == (0xF021BE6E492F0427, 0x6C4AAAEC52F2879D)


def test_prefix_hashes_reject_bad_sizes():
    with pytest.raises(ValueError, match="chunk_chars"):
        prefix_hashes("abc", chunk_chars=0)


# -- common rules ------------------------------------------------------------------------


def test_load_counts_each_request_once():
    assert load(rv("a", inflight=3, running=2, waiting=0)) == 3  # our own count is fresher
    assert load(rv("a", inflight=1, running=4, waiting=2)) == 6  # other clients' requests


@pytest.mark.parametrize("name", BALANCERS)
def test_replicas_at_their_cap_are_never_picked(name):
    balancer = make_balancer(name)
    replicas = [rv("a", 2, max_inflight=2), rv("b", 0, max_inflight=4), rv("c", 9, max_inflight=9)]
    rng = random.Random(0)
    for i in range(50):
        r = req(SYSTEM_A + str(i))
        chosen = balancer.pick(replicas, r, rng)
        assert chosen is not None and chosen.replica_id == "b"
        balancer.on_routed(chosen.replica_id, r)


@pytest.mark.parametrize("name", BALANCERS)
def test_none_when_no_replica_has_capacity(name):
    balancer = make_balancer(name)
    rng = random.Random(0)
    assert balancer.pick([], NO_PREFIX, rng) is None
    full = [rv("a", 1, max_inflight=1), rv("b", 3, max_inflight=3)]
    assert balancer.pick(full, req(SYSTEM_A), rng) is None


def test_make_balancer_names_the_valid_choices():
    with pytest.raises(ConfigError, match="round_robin, least_outstanding"):
        make_balancer("random")
    with pytest.raises(ConfigError, match="prefix_affinity"):
        make_balancer("prefix_affinity", imbalance=3)
    assert make_balancer("prefix_affinity", imbalance_threshold=3).imbalance_threshold == 3


# -- round robin -------------------------------------------------------------------------


def test_round_robin_rotates_in_id_order_and_survives_membership_changes():
    balancer = make_balancer("round_robin")
    rng = random.Random(0)
    replicas = [rv("c"), rv("a"), rv("b")]
    picks = [balancer.pick(replicas, NO_PREFIX, rng).replica_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    # after "a", replica "b" leaves: the rotation goes on to "c", skipping nobody else
    assert balancer.pick(replicas, NO_PREFIX, rng).replica_id == "a"
    assert balancer.pick([rv("a"), rv("c")], NO_PREFIX, rng).replica_id == "c"
    assert balancer.pick([rv("a"), rv("c")], NO_PREFIX, rng).replica_id == "a"


# -- least outstanding (power of two choices) -------------------------------------------


def test_least_outstanding_picks_the_lighter_of_two():
    balancer = make_balancer("least_outstanding")
    rng = random.Random(0)
    pair = [rv("a", 5), rv("b", 1)]
    assert {balancer.pick(pair, NO_PREFIX, rng).replica_id for _ in range(50)} == {"b"}


def test_least_outstanding_never_picks_the_busiest_and_favours_the_idle():
    balancer = make_balancer("least_outstanding")
    rng = random.Random(3)
    replicas = [rv("idle", 0), rv("mid", 3, waiting=2), rv("busy", 1, running=4, waiting=6)]
    counts = Counter(balancer.pick(replicas, NO_PREFIX, rng).replica_id for _ in range(3000))
    assert counts["busy"] == 0
    # P2C over 3: the lightest wins 2 of the 3 possible pairs
    assert counts["idle"] / 3000 == pytest.approx(2 / 3, abs=0.03)


# -- prefix affinity ---------------------------------------------------------------------


def test_prefix_affinity_follows_the_replica_that_served_the_prefix():
    balancer = make_balancer("prefix_affinity")
    rng = random.Random(0)
    replicas = [rv("r1", 1), rv("r2", 3), rv("r3", 0)]
    balancer.on_routed("r2", req(SYSTEM_A + "first question"))
    balancer.on_routed("r1", req(SYSTEM_B + "other"))
    for i in range(20):
        assert balancer.pick(replicas, req(SYSTEM_A + f"question {i}"), rng).replica_id == "r2"
        assert balancer.pick(replicas, req(SYSTEM_B + f"question {i}"), rng).replica_id == "r1"


def test_prefix_affinity_prefers_the_longest_match():
    balancer = make_balancer("prefix_affinity")
    rng = random.Random(0)
    long_doc = SYSTEM_A + "Document: " + "lorem ipsum " * 100
    balancer.on_routed("short", req(SYSTEM_A + "unrelated question"))
    balancer.on_routed("long", req(long_doc + "question 1"))
    replicas = [rv("short"), rv("long"), rv("other")]
    assert balancer.pick(replicas, req(long_doc + "question 2"), rng).replica_id == "long"


def test_prefix_affinity_falls_back_to_least_loaded_when_imbalanced():
    balancer = PrefixAffinity(imbalance_threshold=4)
    rng = random.Random(0)
    balancer.on_routed("hot", req(SYSTEM_A))
    ask = req(SYSTEM_A + "q")
    assert balancer.pick([rv("hot", 4), rv("cold", 0)], ask, rng).replica_id == "hot"  # 4 <= 4
    assert balancer.pick([rv("hot", 5), rv("cold", 0)], ask, rng).replica_id == "cold"  # 5 > 4
    # replica-reported queues count too
    assert balancer.pick([rv("hot", 1, waiting=9), rv("cold", 0)], ask, rng).replica_id == "cold"


def test_prefix_affinity_without_match_uses_power_of_two():
    balancer = make_balancer("prefix_affinity")
    rng = random.Random(0)
    pair = [rv("a", 6), rv("b", 2)]
    assert {balancer.pick(pair, req(SYSTEM_B), rng).replica_id for _ in range(20)} == {"b"}


def test_forget_drops_a_replica_from_the_index():
    balancer = make_balancer("prefix_affinity")
    rng = random.Random(0)
    balancer.on_routed("gone", req(SYSTEM_A))
    balancer.forget("gone")
    pair = [rv("gone", 3), rv("b", 0)]
    assert balancer.pick(pair, req(SYSTEM_A + "q"), rng).replica_id == "b"


def test_prefix_index_is_lru_bounded_and_evicts_deep_chunks_first():
    index = PrefixIndex(capacity=4)
    hashes = prefix_hashes("z" * 256 * 6)  # 6 chained chunks
    index.record("r1", hashes)
    assert len(index) == 4
    assert index.matches(hashes, ["r1"]) == {"r1": 4}  # the 4 leading chunks survive
    other = prefix_hashes("w" * 256 * 2)
    index.record("r2", other)
    assert len(index) == 4
    assert index.matches(other, ["r1", "r2"]) == {"r1": 0, "r2": 2}
    assert index.matches(hashes, ["r1"]) == {"r1": 2}
    index.forget("r1")
    index.forget("r2")
    assert len(index) == 0
    with pytest.raises(ConfigError):
        PrefixIndex(capacity=0)


# -- kv aware ----------------------------------------------------------------------------


def test_kv_aware_prefers_free_kv_cache_at_equal_queues():
    balancer = make_balancer("kv_aware")
    replicas = [rv("a", 1, kv_usage=0.6), rv("b", 1, kv_usage=0.2), rv("c", 1, kv_usage=0.4)]
    assert balancer.pick(replicas, NO_PREFIX, random.Random(0)).replica_id == "b"


def test_kv_aware_scores_match_the_llm_d_weights():
    balancer = KVAware()
    balancer.on_routed("p", req(SYSTEM_A))  # 4 chunks of SYSTEM_A
    ask = req(SYSTEM_A + "x" * 2000)
    n = len(ask.prefix_hashes)
    held = len(req(SYSTEM_A).prefix_hashes)
    replicas = [rv("p", 4, kv_usage=0.5), rv("q", 0, kv_usage=0.1), rv("r", 2, kv_usage=0.3)]
    scores = balancer.scores(replicas, ask)
    assert scores["p"] == pytest.approx(2 * 0.0 + 2 * 0.5 + 3 * held / n)
    assert scores["q"] == pytest.approx(2 * 1.0 + 2 * 0.9)
    assert scores["r"] == pytest.approx(2 * 0.5 + 2 * 0.7)


def test_kv_aware_prefix_outweighs_a_small_queue_and_kv_edge():
    balancer = make_balancer("kv_aware")
    balancer.on_routed("holder", req(SYSTEM_A))
    replicas = [rv("holder", 2, kv_usage=0.5), rv("fresh", 1, kv_usage=0.3)]
    # holder: 2*0 + 2*0.5 + 3*1 = 4.0; fresh: 2*1 + 2*0.7 + 0 = 3.4
    assert balancer.pick(replicas, req(SYSTEM_A), random.Random(0)).replica_id == "holder"


def test_kv_aware_avoids_saturated_replicas_unless_all_are():
    balancer = make_balancer("kv_aware")
    balancer.on_routed("hot", req(SYSTEM_A))
    rng = random.Random(0)
    ask = req(SYSTEM_A)
    hot_kv = [rv("hot", 0, kv_usage=0.85), rv("cool", 3, kv_usage=0.5)]
    assert balancer.pick(hot_kv, ask, rng).replica_id == "cool"
    hot_queue = [rv("hot", 0, waiting=5), rv("cool", 3, kv_usage=0.5)]
    assert balancer.pick(hot_queue, ask, rng).replica_id == "cool"
    all_hot = [rv("hot", 0, kv_usage=0.9), rv("cool", 3, kv_usage=0.95)]
    assert balancer.pick(all_hot, ask, rng).replica_id == "hot"


def test_kv_aware_breaks_ties_with_the_rng():
    balancer = make_balancer("kv_aware")
    replicas = [rv("a"), rv("b"), rv("c")]
    picks = [balancer.pick(replicas, NO_PREFIX, random.Random(s)).replica_id for s in range(60)]
    assert set(picks) == {"a", "b", "c"}
    again = [balancer.pick(replicas, NO_PREFIX, random.Random(s)).replica_id for s in range(60)]
    assert picks == again  # same seed, same choice
