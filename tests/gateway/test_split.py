"""Traffic split: weighted rendezvous hashing with sticky keys, weighted random without."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmfleet.gateway.policies.split import (
    VersionWeight,
    choose_version,
    rendezvous_score,
    split_counts,
)

KEYS = [f"user-{i}" for i in range(10_000)]


def vw(**weights: float) -> list[VersionWeight]:
    return [VersionWeight(name, w) for name, w in weights.items()]


def assignment(versions: list[VersionWeight], keys: list[str]) -> list[str]:
    rng = random.Random(0)
    return [choose_version(versions, k, rng) for k in keys]


def test_sticky_key_keeps_its_version_when_weights_are_unchanged():
    versions = vw(a=90, b=10)
    first = assignment(versions, KEYS)
    # a different rng, another call order and the versions listed the other way round
    rng = random.Random(12345)
    again = [choose_version(list(reversed(versions)), k, rng) for k in reversed(KEYS)]
    assert first == list(reversed(again))


def test_hash_is_stable_across_processes():
    # pinned values: Python's salted hash() would change these from run to run
    versions = vw(a=50, b=50)
    got = [choose_version(versions, f"k{i}", random.Random(0)) for i in range(12)]
    assert got == ["a", "a", "a", "a", "a", "b", "b", "b", "a", "b", "a", "a"]


def test_keyed_split_follows_the_weights():
    counts = split_counts(vw(a=70, b=20, c=10), KEYS, random.Random(0))
    shares = {k: v / len(KEYS) for k, v in counts.items()}
    assert shares["a"] == pytest.approx(0.70, abs=0.015)
    assert shares["b"] == pytest.approx(0.20, abs=0.015)
    assert shares["c"] == pytest.approx(0.10, abs=0.015)


def test_random_split_follows_the_weights_with_a_fixed_seed():
    counts = split_counts(vw(a=3, b=1), [None] * 20_000, random.Random(7))
    assert counts["a"] / 20_000 == pytest.approx(0.75, abs=0.015)


def test_moving_90_10_to_80_20_moves_about_a_tenth_only_towards_the_growing_version():
    before = assignment(vw(a=90, b=10), KEYS)
    after = assignment(vw(a=80, b=20), KEYS)
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert len(moved) / len(KEYS) == pytest.approx(0.10, abs=0.015)
    assert set(moved) == {("a", "b")}  # never from the growing version to the shrinking one


def test_adding_a_version_takes_keys_only_for_itself():
    before = assignment(vw(a=50, b=50), KEYS)
    after = assignment(vw(a=50, b=50, c=25), KEYS)
    changed = [y for x, y in zip(before, after, strict=True) if x != y]
    assert set(changed) == {"c"}
    assert len(changed) / len(KEYS) == pytest.approx(0.2, abs=0.015)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(0.5, 100.0), min_size=2, max_size=4),
    data=st.data(),
)
def test_changing_one_weight_moves_keys_only_to_or_from_that_version(weights, data):
    index = data.draw(st.integers(0, len(weights) - 1))
    factor = data.draw(st.sampled_from([0.25, 0.5, 2.0, 4.0]))
    names = [f"v{i}" for i in range(len(weights))]
    before_v = [VersionWeight(n, w) for n, w in zip(names, weights, strict=True)]
    after_v = list(before_v)
    after_v[index] = VersionWeight(names[index], weights[index] * factor)
    keys = KEYS[:300]
    for x, y in zip(assignment(before_v, keys), assignment(after_v, keys), strict=True):
        if x == y:
            continue
        if factor > 1:
            assert y == names[index]  # growth only attracts keys
        else:
            assert x == names[index]  # shrinking only releases keys


def test_zero_weight_versions_are_never_chosen():
    versions = vw(a=0, b=1, c=0)
    assert set(assignment(versions, KEYS[:2000])) == {"b"}
    assert split_counts(versions, [None] * 2000, random.Random(1)) == {"a": 0, "b": 2000, "c": 0}
    assert rendezvous_score("k", "a", 0.0) == 0.0


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ([], "no versions"),
        (vw(a=0, b=0), "all versions have weight 0"),
        (vw(a=-1, b=2), "must be finite and >= 0"),
        (vw(a=float("nan")), "must be finite and >= 0"),
        ([VersionWeight("a", 1), VersionWeight("a", 2)], "listed twice"),
    ],
)
def test_invalid_weights_raise(versions, message):
    with pytest.raises(ValueError, match=message):
        choose_version(versions, "key", random.Random(0))
    with pytest.raises(ValueError, match=message):
        choose_version(versions, None, random.Random(0))
