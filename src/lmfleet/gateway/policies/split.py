"""Traffic split across the versions of one model.

Boundary: given the versions' weights and an optional sticky key (a user id, a
session id), name the version that serves the request. No I/O; the caller handles
header overrides, shadow traffic and replica choice.

With a key the choice is *weighted rendezvous hashing* (highest random weight): each
version draws a pseudo-random ``u`` in (0, 1) from a stable hash of (key, version) and
scores ``-weight / ln(u)``; the highest score wins. The winner is ``version i`` with
probability ``weight_i / sum(weights)``, the same key keeps its version while the
weights stay the same, and when weights change only the minimal share of keys moves:
raising one version's weight moves keys only *to* it, lowering it moves keys only
*away from* it. Python's ``hash()`` is salted per process, so the hash is blake2b,
which gives the same answer in every gateway process and on every machine.

Without a key the choice is weighted random with the caller's ``random.Random``.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: 2**53: a 53-bit integer maps onto a float in (0, 1) without rounding
_TWO_53 = float(1 << 53)


@dataclass(frozen=True, slots=True)
class VersionWeight:
    """One version of a model and its share of traffic (any non-negative scale)."""

    name: str
    weight: float


def choose_version(
    versions: Sequence[VersionWeight], sticky_key: str | None, rng: random.Random
) -> str:
    """The name of the version that serves a request.

    ``sticky_key`` set: weighted rendezvous hashing (deterministic, ``rng`` unused).
    ``sticky_key`` None: weighted random draw from ``rng``.
    Zero-weight versions are never chosen. Raises ``ValueError`` if ``versions`` is
    empty, a weight is negative or not finite, a name repeats, or all weights are 0.
    """
    _validate(versions)
    if sticky_key is None:
        return _weighted_random(versions, rng)
    return _rendezvous(versions, sticky_key)


def split_counts(
    versions: Sequence[VersionWeight], keys: Iterable[str | None], rng: random.Random
) -> dict[str, int]:
    """How many of ``keys`` each version receives (every version listed, 0 included).

    A helper for tests, simulation and the admin API's "what would this split do".
    """
    counts = {v.name: 0 for v in versions}
    for key in keys:
        counts[choose_version(versions, key, rng)] += 1
    return counts


def rendezvous_score(key: str, version: str, weight: float) -> float:
    """The weighted rendezvous score of ``version`` for ``key``; the highest wins.

    ``-weight / ln(u)`` with ``u`` uniform in (0, 1): ``P(version wins)`` is
    proportional to its weight. Weight 0 scores 0, below every positive weight.
    """
    if weight <= 0:
        return 0.0
    return -weight / math.log(_unit_hash(key, version))


def _rendezvous(versions: Sequence[VersionWeight], key: str) -> str:
    best_name = ""
    best_score = -1.0
    for v in versions:
        score = rendezvous_score(key, v.name, v.weight)
        if score > best_score:
            best_name, best_score = v.name, score
    return best_name


def _weighted_random(versions: Sequence[VersionWeight], rng: random.Random) -> str:
    total = math.fsum(v.weight for v in versions)
    point = rng.random() * total
    acc = 0.0
    last_positive = ""
    for v in versions:
        if v.weight <= 0:
            continue
        acc += v.weight
        last_positive = v.name
        if point < acc:
            return v.name
    return last_positive  # point == total after rounding: the last positive weight


def _unit_hash(key: str, version: str) -> float:
    """A stable pseudo-random number in the open interval (0, 1)."""
    digest = hashlib.blake2b(
        key.encode("utf-8") + b"\x00" + version.encode("utf-8"), digest_size=8
    ).digest()
    top53 = int.from_bytes(digest, "big") >> 11
    return (top53 + 0.5) / _TWO_53


def _validate(versions: Sequence[VersionWeight]) -> None:
    if not versions:
        raise ValueError("no versions to choose from")
    seen: set[str] = set()
    for v in versions:
        if not math.isfinite(v.weight) or v.weight < 0:
            raise ValueError(f"version {v.name!r}: weight must be finite and >= 0, got {v.weight}")
        if v.name in seen:
            raise ValueError(f"version {v.name!r} listed twice")
        seen.add(v.name)
    if not any(v.weight > 0 for v in versions):
        names = ", ".join(v.name for v in versions)
        raise ValueError(f"all versions have weight 0 ({names}): give at least one a weight > 0")
