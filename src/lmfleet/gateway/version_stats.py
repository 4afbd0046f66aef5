"""Per-version load over a recent window: the autoscaler's signal.

Boundary: plain numbers in, plain numbers out; no I/O. The proxy records each
request's arrival (once its version is chosen) and its finish; the autoscaler's
controller notes each measured time-to-ready and wake; :meth:`VersionStats.window`
reads one (model, version) as a :class:`VersionWindow`, and :func:`versions_snapshot`
is the JSON of every version (``GET /admin/versions``).

What counts:

- **Arrivals**: every request assigned to the version (split or header-pinned),
  those the admission queue then refuses included: they are demand. Shadow copies
  count as arrivals of the shadow version when they are sent (not when skipped):
  they are real load on its replicas.
- **Finishes**: every request that ends, whatever the outcome (client disconnects
  included: their tokens were generated). ``errors`` are those the proxy counts as
  errors (``lmfleet_gateway_errors_total``). Output tokens are counted when the
  request finishes, so a long stream's tokens land in the window at its end.
- **TTFT and TPOT** are the samples the Prometheus histograms observe: streamed
  requests that did not fail (a unary answer shows no first token).

The window: samples from the last ``window_s`` seconds (default 60), the interval
``(now - window_s, now]`` (left-open, as Prometheus 3's range selectors). Rates divide by
the span actually observed, ``min(window_s, time since the version's first
arrival or finish)``, so the first seconds after a start or a new version are not
diluted by time nobody watched; the span is at least ``min_span_s`` (1 s), so one
request a millisecond after start does not read as a thousand per second. The span
used is reported as ``window_s``. Memory is bounded: samples older than the window
are dropped, and at most ``max_samples`` arrivals and finishes are kept per version;
when the cap drops a sample still inside the window, the span starts after it, so
rates stay rates over the samples kept (under very high load the window is shorter,
not undercounted). Percentiles: numpy's linear interpolation, as in
:mod:`lmfleet.gateway.abstats`.

Single-threaded by design: the proxy, the controller and the scrape all run on the
gateway's event loop.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from lmfleet.gateway.registry import ReplicaInfo
    from lmfleet.gateway.state import GatewayState

#: seconds of history :meth:`VersionStats.window` reads
DEFAULT_WINDOW_S = 60.0
#: arrivals (and finishes) kept per version at most
DEFAULT_MAX_SAMPLES = 20_000
#: the shortest span a rate is divided by
DEFAULT_MIN_SPAN_S = 1.0
#: replica states reported (``ReplicaInfo.state``); anything else counts as "other"
REPLICA_STATES = (
    "ready", "starting", "draining", "asleep", "stopped", "unreachable", "engine_dead",
    "unknown", "other",
)  # fmt: skip
#: states whose ``running``/``waiting`` are stale (the last poll did not read them)
_STALE_STATES = frozenset({"unreachable", "unknown"})

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class VersionWindow:
    """One version over the recent window; None where there is no sample."""

    #: arrivals per second over ``window_s``
    arrival_rate: float | None
    #: output tokens of requests finished in the window, per second
    output_tokens_per_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    #: requests finished in the window, and those of them that failed
    requests: int
    errors: int
    #: the span the rates and counts cover (0 before the first record)
    window_s: float
    #: the last measured time-to-ready and wake (the controller's), and how many
    time_to_ready_s: float | None
    wake_s: float | None
    time_to_ready_count: int = 0
    wake_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Finish(NamedTuple):
    t: float
    ttft_s: float | None
    tpot_s: float | None
    output_tokens: int
    error: bool


@dataclass(slots=True)
class _Series:
    arrivals: deque[float] = field(default_factory=deque)
    finishes: deque[_Finish] = field(default_factory=deque)
    #: time of the version's first arrival or finish
    first: float | None = None
    #: time of the newest sample the cap dropped (the span starts there)
    capped_at: float | None = None
    time_to_ready_s: float | None = None
    time_to_ready_count: int = 0
    wake_s: float | None = None
    wake_count: int = 0


def _quantiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p90 = np.percentile(np.asarray(values, float), (50, 90))
    return float(p50), float(p90)


class VersionStats:
    """Arrivals, finishes, time-to-ready and wake per (model, version); see the
    module docstring for what counts and how the window is read."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        min_span_s: float = DEFAULT_MIN_SPAN_S,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be ≥ 1, got {max_samples}")
        if min_span_s < 0:
            raise ValueError(f"min_span_s must be ≥ 0, got {min_span_s}")
        self.window_s = float(window_s)
        self.max_samples = max_samples
        self.min_span_s = float(min_span_s)
        self._clock = clock
        self._series: dict[Key, _Series] = {}

    # ---- recording --------------------------------------------------------------------
    def record_arrival(self, model: str, version: str) -> None:
        """A request was assigned to ``version`` (shadow copies included)."""
        now = self._clock()
        s = self._started((model, version), now)
        s.arrivals.append(now)
        self._trim(s, now)
        while len(s.arrivals) > self.max_samples:
            self._capped(s, s.arrivals.popleft())

    def record_finish(
        self,
        model: str,
        version: str,
        *,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        output_tokens: int = 0,
        error: bool = False,
    ) -> None:
        """A request ended: its latencies (None where not measured), the tokens it
        generated, and whether it failed."""
        now = self._clock()
        s = self._started((model, version), now)
        s.finishes.append(_Finish(now, ttft_s, tpot_s, max(0, int(output_tokens)), error))
        self._trim(s, now)
        while len(s.finishes) > self.max_samples:
            self._capped(s, s.finishes.popleft().t)

    def note_time_to_ready(self, model: str, version: str, seconds: float) -> None:
        """A replica of ``version`` took ``seconds`` from start to READY."""
        s = self._get((model, version))
        s.time_to_ready_s = float(seconds)
        s.time_to_ready_count += 1

    def note_wake(self, model: str, version: str, seconds: float) -> None:
        """A replica of ``version`` took ``seconds`` from asleep to READY."""
        s = self._get((model, version))
        s.wake_s = float(seconds)
        s.wake_count += 1

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget every version not in ``keys`` (a reload removed it)."""
        keep = set(keys)
        for key in [k for k in self._series if k not in keep]:
            del self._series[key]

    def keys(self) -> list[Key]:
        return list(self._series)

    # ---- reading ----------------------------------------------------------------------
    def window(self, model: str, version: str) -> VersionWindow:
        """``version`` over the recent window (all None and 0 when never seen)."""
        s = self._series.get((model, version))
        if s is None:
            return VersionWindow(None, None, None, None, None, None, 0, 0, 0.0, None, None)
        now = self._clock()
        self._trim(s, now)
        ttr, wake = s.time_to_ready_s, s.wake_s
        counts = {"time_to_ready_count": s.time_to_ready_count, "wake_count": s.wake_count}
        if s.first is None:  # only the controller's notes so far
            return VersionWindow(None, None, None, None, None, None, 0, 0, 0.0, ttr, wake,
                                 **counts)  # fmt: skip
        # kept samples are within (now - window_s, now] and none precedes ``first``;
        # after the cap dropped one, the span starts there for both kinds of sample
        capped = s.capped_at if s.capped_at is not None else -math.inf
        start = max(now - self.window_s, s.first, capped)
        span = max(now - start, min(self.min_span_s, self.window_s))
        arrivals = sum(1 for t in s.arrivals if t >= capped)
        done = [f for f in s.finishes if f.t >= capped]
        ttft50, ttft90 = _quantiles([f.ttft_s for f in done if f.ttft_s is not None])
        tpot50, tpot90 = _quantiles([f.tpot_s for f in done if f.tpot_s is not None])
        return VersionWindow(
            arrival_rate=arrivals / span,
            output_tokens_per_s=sum(f.output_tokens for f in done) / span,
            ttft_p50_s=ttft50, ttft_p90_s=ttft90, tpot_p50_s=tpot50, tpot_p90_s=tpot90,
            requests=len(done), errors=sum(1 for f in done if f.error), window_s=span,
            time_to_ready_s=ttr, wake_s=wake, **counts,
        )  # fmt: skip

    # ---- internals --------------------------------------------------------------------
    def _get(self, key: Key) -> _Series:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series()
        return s

    def _started(self, key: Key, now: float) -> _Series:
        s = self._get(key)
        if s.first is None:
            s.first = now
        return s

    @staticmethod
    def _capped(s: _Series, t: float) -> None:
        """The cap dropped a sample of time ``t``: the span starts there."""
        s.capped_at = t if s.capped_at is None else max(s.capped_at, t)

    def _trim(self, s: _Series, now: float) -> None:
        horizon = now - self.window_s
        while s.arrivals and s.arrivals[0] <= horizon:
            s.arrivals.popleft()
        while s.finishes and s.finishes[0].t <= horizon:
            s.finishes.popleft()


# ---- the JSON of every version ---------------------------------------------------------


def replicas_by_state(replicas: Iterable[ReplicaInfo]) -> dict[str, int]:
    """How many replicas are in each of :data:`REPLICA_STATES` (all present)."""
    counts = dict.fromkeys(REPLICA_STATES, 0)
    for r in replicas:
        counts[r.state if r.state in counts else "other"] += 1
    return counts


def versions_snapshot(state: GatewayState) -> dict[str, dict[str, dict[str, Any]]]:
    """Model → version → weight, the gateway's queue (depth, in-flight, capacity),
    the replicas' own ``running``/``waiting`` summed (from their ``/state`` polls;
    replicas whose last poll failed are left out, their figures being stale),
    replicas by state and the window's figures (:class:`VersionWindow`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in state.registry.all_versions():
        fresh = [r for r in v.replicas.values() if r.state not in _STALE_STATES]
        out.setdefault(v.model, {})[v.name] = {
            "weight": v.weight,
            "queue_depth": v.queue.depth,
            "inflight": v.queue.inflight,
            "capacity": v.queue.capacity,
            "replica_running": sum(r.running for r in fresh),
            "replica_waiting": sum(r.waiting for r in fresh),
            "replicas": replicas_by_state(v.replicas.values()),
            "window": state.version_stats.window(v.model, v.name).to_dict(),
        }
    return out
