"""Balancing across the replicas of one model version.

Boundary: given plain views of the replicas (the gateway's own in-flight count plus
what each replica last reported on its JSON state endpoint) and the request's prefix
hashes, pick one replica, or None when none has capacity. No I/O, no clock; the only
randomness is the caller's ``random.Random``, so a seeded run is reproducible.

Policies (``make_balancer(name, **params)``):

- ``round_robin``: rotate through the eligible replicas in replica-id order.
- ``least_outstanding``: power of two choices on load.
- ``prefix_affinity``: the replica that served the longest matching prompt prefix
  (its prefix cache likely still holds it), unless that replica is more than
  ``imbalance_threshold`` requests busier than the least loaded one; then, and when
  nothing matches, power of two choices (the Ray Serve LLM prefix-aware router).
- ``kv_aware``: the llm-d endpoint picker's weighted scorers, queue 2, KV-cache
  usage 2, prefix affinity 3, each normalized to [0, 1]; saturated replicas (queue
  5 or KV usage 0.8) are used only when every eligible replica is saturated.

Eligible means under the gateway's concurrency cap (``inflight < max_inflight``).

Load: ``max(inflight, running + waiting)``. The gateway's in-flight count is fresh
but sees only this gateway's requests; the replica's running + waiting is stale by a
poll interval but includes every client's. Taking the larger counts each request once
(their sum would count this gateway's requests twice) and stays right when several
gateway processes share the replicas.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmfleet.errors import ConfigError

#: names accepted by :func:`make_balancer`
BALANCERS = ("round_robin", "least_outstanding", "prefix_affinity", "kv_aware")

#: default number of prefix hashes the index remembers (an entry is a few hundred bytes)
DEFAULT_INDEX_CAPACITY = 100_000


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the balancer knows of one replica."""

    replica_id: str
    url: str
    inflight: int  # the gateway's own in-flight count
    running: int = 0  # from the replica's /state
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    max_inflight: int | None = None  # concurrency cap at the gateway; None = no cap


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the balancer knows of one request."""

    prefix_hashes: tuple[int, ...]  # chained hashes of the prompt's leading chunks


class Balancer(Protocol):
    """Picks a replica of one version for each request."""

    def pick(
        self, replicas: Sequence[ReplicaView], req: RouteRequest, rng: random.Random
    ) -> ReplicaView | None:
        """The replica to send ``req`` to; None if no replica has capacity."""
        ...

    def on_routed(self, replica_id: str, req: RouteRequest) -> None:
        """``req`` was sent to ``replica_id`` (after retries: the one that took it)."""
        ...

    def forget(self, replica_id: str) -> None:
        """The replica was removed or ejected: drop what is remembered of it."""
        ...


def prefix_hashes(text: str, chunk_chars: int = 256, max_chunks: int = 64) -> tuple[int, ...]:
    """Chained 64-bit blake2b hashes of the full ``chunk_chars`` chunks of ``text``.

    Hash ``i`` covers characters ``[0, (i + 1) * chunk_chars)``, so two prompts share
    hash ``i`` exactly when they share that whole prefix. Only full chunks count (a
    trailing partial chunk changes as the prompt grows and would never match), like
    the engine's block hashes. Characters, not tokens: the gateway has no tokenizer.
    Stable across processes and machines.
    """
    if chunk_chars <= 0 or max_chunks < 0:
        raise ValueError(
            f"chunk_chars must be > 0 and max_chunks >= 0, got {chunk_chars}, {max_chunks}"
        )
    n = min(len(text) // chunk_chars, max_chunks)
    out: list[int] = []
    parent = b""
    for i in range(n):
        chunk = text[i * chunk_chars : (i + 1) * chunk_chars].encode("utf-8")
        parent = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        out.append(int.from_bytes(parent, "big"))
    return tuple(out)


def load(view: ReplicaView) -> int:
    """Outstanding requests on a replica, counting each once (see the module doc)."""
    return max(view.inflight, view.running + view.waiting)


def eligible(replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
    """The replicas under their gateway concurrency cap."""
    return [r for r in replicas if r.max_inflight is None or r.inflight < r.max_inflight]


def power_of_two(candidates: Sequence[ReplicaView], rng: random.Random) -> ReplicaView | None:
    """Of two distinct replicas drawn at random, the less loaded (first drawn on a tie)."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(range(len(candidates)), 2)
    return candidates[b] if load(candidates[b]) < load(candidates[a]) else candidates[a]


class PrefixIndex:
    """Which replicas recently served which prompt prefixes, bounded LRU.

    Keyed by prefix hash; each hash maps to the replicas it was routed to. Routing a
    request touches its deepest hash first and its shallowest last, so under memory
    pressure the long tails go before the widely shared leading chunks.
    """

    def __init__(self, capacity: int = DEFAULT_INDEX_CAPACITY) -> None:
        if capacity <= 0:
            raise ConfigError(f"prefix index capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self._holders: OrderedDict[int, dict[str, None]] = OrderedDict()
        self._by_replica: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, replica_id: str, hashes: Sequence[int]) -> None:
        """``replica_id`` now holds the prefixes ``hashes``."""
        mine = self._by_replica.setdefault(replica_id, set())
        for h in reversed(hashes):
            holders = self._holders.get(h)
            if holders is None:
                holders = self._holders[h] = {}
            else:
                self._holders.move_to_end(h)
            holders.pop(replica_id, None)
            holders[replica_id] = None  # most recent holder last
            mine.add(h)
        while len(self._holders) > self.capacity:
            self._evict_oldest()

    def matches(self, hashes: Sequence[int], replica_ids: Sequence[str]) -> dict[str, int]:
        """For each of ``replica_ids``, how many leading chunks of ``hashes`` it holds.

        The hashes are chained, so holding hash ``i`` means holding the whole prefix up
        to chunk ``i``; the scan stops at the first hash nobody holds.
        """
        wanted = set(replica_ids)
        out = dict.fromkeys(replica_ids, 0)
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            for rid in holders:
                if rid in wanted:
                    out[rid] = i + 1
        return out

    def forget(self, replica_id: str) -> None:
        for h in self._by_replica.pop(replica_id, set()):
            holders = self._holders.get(h)
            if holders is None:
                continue
            holders.pop(replica_id, None)
            if not holders:
                del self._holders[h]

    def _evict_oldest(self) -> None:
        h, holders = self._holders.popitem(last=False)
        for rid in holders:
            mine = self._by_replica.get(rid)
            if mine is not None:
                mine.discard(h)


class RoundRobin:
    """Rotate through the eligible replicas in replica-id order.

    Remembers the last id picked rather than a position, so replicas joining,
    leaving or hitting their cap do not make it skip or repeat others.
    """

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(
        self, replicas: Sequence[ReplicaView], req: RouteRequest, rng: random.Random
    ) -> ReplicaView | None:
        ordered = sorted(eligible(replicas), key=lambda r: r.replica_id)
        if not ordered:
            return None
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((r for r in ordered if r.replica_id > self._last), ordered[0])
        self._last = chosen.replica_id
        return chosen

    def on_routed(self, replica_id: str, req: RouteRequest) -> None:
        return None

    def forget(self, replica_id: str) -> None:
        return None


class LeastOutstanding:
    """Power of two choices on load: near least-loaded, without herding on one replica
    when the loads the gateway sees are a poll interval old."""

    def pick(
        self, replicas: Sequence[ReplicaView], req: RouteRequest, rng: random.Random
    ) -> ReplicaView | None:
        return power_of_two(eligible(replicas), rng)

    def on_routed(self, replica_id: str, req: RouteRequest) -> None:
        return None

    def forget(self, replica_id: str) -> None:
        return None


class PrefixAffinity:
    """Longest matching prefix, guarded against imbalance, else power of two choices.

    ``imbalance_threshold`` defaults to 5, not Ray Serve's 10: lmfleet fleets are often
    a handful of replicas with modest batch sizes, where ten extra queued requests
    cost more time than re-computing a prefill, and 5 is where llm-d calls a replica's
    queue saturated. Raise it for big batches and long shared prefixes.
    """

    def __init__(
        self, imbalance_threshold: int = 5, index_capacity: int = DEFAULT_INDEX_CAPACITY
    ) -> None:
        if imbalance_threshold < 0:
            raise ConfigError(f"imbalance_threshold must be >= 0, got {imbalance_threshold}")
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex(index_capacity)

    def pick(
        self, replicas: Sequence[ReplicaView], req: RouteRequest, rng: random.Random
    ) -> ReplicaView | None:
        candidates = eligible(replicas)
        if not candidates:
            return None
        matched = self.index.matches(req.prefix_hashes, [r.replica_id for r in candidates])
        best = max(matched.values(), default=0)
        if best == 0:
            return power_of_two(candidates, rng)
        holders = [r for r in candidates if matched[r.replica_id] == best]
        chosen = _least_loaded(holders, rng)
        if load(chosen) - min(load(r) for r in candidates) > self.imbalance_threshold:
            return power_of_two(candidates, rng)
        return chosen

    def on_routed(self, replica_id: str, req: RouteRequest) -> None:
        self.index.record(replica_id, req.prefix_hashes)

    def forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)


class KVAware:
    """The llm-d endpoint picker: the highest weighted score wins (ties at random).

    Scores, each in [0, 1]:
    - queue: ``(max_load - load) / (max_load - min_load)`` across the candidates
      (1 for all when every load is equal), llm-d's min-max queue scorer;
    - kv: ``1 - kv_usage``;
    - prefix: the fraction of the request's prefix chunks the replica holds.
    """

    def __init__(
        self,
        w_queue: float = 2.0,
        w_kv: float = 2.0,
        w_prefix: float = 3.0,
        saturation_queue: int = 5,
        saturation_kv: float = 0.8,
        index_capacity: int = DEFAULT_INDEX_CAPACITY,
    ) -> None:
        if min(w_queue, w_kv, w_prefix) < 0:
            raise ConfigError(f"scorer weights must be >= 0, got {w_queue}, {w_kv}, {w_prefix}")
        self.w_queue, self.w_kv, self.w_prefix = w_queue, w_kv, w_prefix
        self.saturation_queue = saturation_queue
        self.saturation_kv = saturation_kv
        self.index = PrefixIndex(index_capacity)

    def is_saturated(self, view: ReplicaView) -> bool:
        return view.waiting >= self.saturation_queue or view.kv_usage >= self.saturation_kv

    def scores(self, candidates: Sequence[ReplicaView], req: RouteRequest) -> dict[str, float]:
        """The weighted score of each candidate, by replica id (for tests and debugging)."""
        loads = [load(r) for r in candidates]
        lo, hi = min(loads, default=0), max(loads, default=0)
        matched = self.index.matches(req.prefix_hashes, [r.replica_id for r in candidates])
        n_chunks = len(req.prefix_hashes)
        out: dict[str, float] = {}
        for r, q in zip(candidates, loads, strict=True):
            queue = 1.0 if hi == lo else (hi - q) / (hi - lo)
            kv = 1.0 - min(max(r.kv_usage, 0.0), 1.0)
            prefix = matched[r.replica_id] / n_chunks if n_chunks else 0.0
            out[r.replica_id] = self.w_queue * queue + self.w_kv * kv + self.w_prefix * prefix
        return out

    def pick(
        self, replicas: Sequence[ReplicaView], req: RouteRequest, rng: random.Random
    ) -> ReplicaView | None:
        candidates = eligible(replicas)
        if not candidates:
            return None
        unsaturated = [r for r in candidates if not self.is_saturated(r)]
        pool = unsaturated or candidates
        scores = self.scores(pool, req)
        top = max(scores.values())
        best = [r for r in pool if scores[r.replica_id] >= top - 1e-9]
        return best[0] if len(best) == 1 else rng.choice(best)

    def on_routed(self, replica_id: str, req: RouteRequest) -> None:
        self.index.record(replica_id, req.prefix_hashes)

    def forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)


_FACTORIES: dict[str, Callable[..., Balancer]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "prefix_affinity": PrefixAffinity,
    "kv_aware": KVAware,
}


def make_balancer(name: str, **params: object) -> Balancer:
    """A new balancer by policy name (one per model version: each keeps its own state).

    Raises ``ConfigError`` for an unknown name or parameter, naming the valid ones.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown balancer {name!r}; choose one of {', '.join(BALANCERS)}")
    try:
        return factory(**params)
    except TypeError as e:
        raise ConfigError(f"balancer {name!r}: {e}") from None


def _least_loaded(candidates: Sequence[ReplicaView], rng: random.Random) -> ReplicaView:
    lowest = min(load(r) for r in candidates)
    tied = [r for r in candidates if load(r) == lowest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
