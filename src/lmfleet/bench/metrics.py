"""Per-request records and their summaries: pure arithmetic, no I/O.

Definitions (those of ``vllm bench serve``):
- TTFT: from sending the request to the first chunk that carries output.
- E2EL: from sending the request to the end of its stream.
- TPOT: ``(E2EL − TTFT) / (output tokens − 1)``, per request; undefined for one token.
- ITL: every gap between two consecutive output chunks, over all requests.
- Request throughput: completed requests / duration; output tok/s: output tokens of
  completed requests / duration; duration runs from the start to the last completion.
- Goodput: completed requests that meet every SLO, per second of duration.

Times are in seconds here; the report shows milliseconds.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmfleet.bench.arrivals import scheduled_rate
from lmfleet.errors import ConfigError

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are offsets in seconds: ``scheduled_time``
    and ``send_time`` from the start of the run, the others from ``send_time``."""

    index: int
    scheduled_time: float
    #: prompt tokens we meant to send (the target's count, when it reports usage, is
    #: ``prompt_tokens``)
    input_len: int
    #: ``max_tokens`` asked for
    output_len: int
    session_id: str | None = None
    turn: int = 0
    send_time: float = math.nan
    success: bool = False
    #: error type: ``http_<status>``, ``timeout``, ``connect``, ``disconnect``,
    #: ``disconnect_before_response``, ``stream_error``, ``bad_response``, or an
    #: exception class name (see ``client``)
    error: str | None = None
    error_detail: str = ""
    status: int | None = None
    ttft: float | None = None
    latency: float | None = None
    #: arrival of each output chunk, from ``send_time``
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        return tpot(self.latency, self.ttft, self.output_tokens)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def end_time(self) -> float:
        """Offset from the start of the run at which the request ended."""
        return self.send_time + (self.latency or 0.0)


def tpot(latency: float | None, ttft: float | None, output_tokens: int) -> float | None:
    """Time per output token after the first; None when it is undefined."""
    if latency is None or ttft is None or output_tokens < 2:
        return None
    return (latency - ttft) / (output_tokens - 1)


# ---- statistics -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    #: percentile (e.g. 99.0) -> value
    percentiles: dict[float, float]

    def p(self, q: float) -> float:
        return self.percentiles[float(q)]

    def to_dict(self, scale: float = 1.0) -> dict[str, float | int]:
        out: dict[str, float | int] = {"count": self.count}
        for name in ("mean", "median", "std", "min", "max"):
            out[name] = getattr(self, name) * scale
        for q, v in self.percentiles.items():
            out[f"p{q:g}"] = v * scale
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default); nan when
    there are no values."""
    if not len(values):
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def stats(values: Iterable[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Stats:
    a = np.fromiter(values, dtype=np.float64)
    if a.size == 0:
        nan = math.nan
        return Stats(0, nan, nan, nan, nan, nan, {float(q): nan for q in percentiles})
    pct = np.percentile(a, list(percentiles)) if percentiles else []
    return Stats(
        count=int(a.size),
        mean=float(a.mean()),
        median=float(np.median(a)),
        std=float(a.std()),
        min=float(a.min()),
        max=float(a.max()),
        percentiles={float(q): float(v) for q, v in zip(percentiles, pct, strict=True)},
    )


# ---- SLOs and goodput -------------------------------------------------------------------
def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds) -> ``{"ttft": 0.5, "tpot": 0.05}``."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ConfigError(
                f"goodput: expected NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)}, e.g. ttft:500; got {item!r}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"goodput: {item!r}: {value!r} is not a number") from None
        if ms <= 0:
            raise ConfigError(f"goodput: {item!r}: the limit must be positive")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: Mapping[str, float]) -> bool:
    """True when the request completed and every SLO it has a value for holds
    (TPOT is not judged for one-token outputs)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2el": record.latency}
    for name, limit in slos.items():
        v = values[name]
        if v is None and name == "tpot":
            continue
        if v is None or v > limit:
            return False
    return True


def goodput(records: Sequence[RequestRecord], slos: Mapping[str, float], duration: float) -> float:
    """Requests per second that completed within every SLO."""
    if duration <= 0:
        return 0.0
    return sum(meets_slos(r, slos) for r in records) / duration


# ---- concurrency and time series --------------------------------------------------------
def max_in_flight(records: Sequence[RequestRecord]) -> int:
    """The most requests that were in flight at once."""
    events: list[tuple[float, int]] = []
    for r in records:
        if not math.isnan(r.send_time):
            events.append((r.send_time, 1))
            events.append((r.end_time, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@dataclass(frozen=True, slots=True)
class Timeline:
    """Rates over the run: bin ``i`` covers ``[t[i], t[i] + bin_s)`` (the last bin
    may be shorter; its rates are per second of its own length)."""

    bin_s: float
    t: list[float]
    completed_per_s: list[float]
    output_tokens_per_s: list[float]
    #: requests in flight at the middle of each bin
    in_flight: list[int]


def timeline(records: Sequence[RequestRecord], duration: float, bin_s: float = 1.0) -> Timeline:
    n = max(1, math.ceil(duration / bin_s))
    last = n - 1
    widths = np.full(n, bin_s)
    widths[last] = max(duration - last * bin_s, 1e-9) if duration > 0 else bin_s
    done = np.zeros(n)
    toks = np.zeros(n)
    sent = [r for r in records if not math.isnan(r.send_time)]
    for r in sent:
        if not r.success:
            continue
        end = min(last, int(r.end_time / bin_s))
        done[end] += 1
        if r.chunk_times:  # spread the tokens over the chunks that carried them
            per_chunk = r.output_tokens / len(r.chunk_times)
            bins = ((r.send_time + np.asarray(r.chunk_times)) / bin_s).astype(np.int64)
            np.add.at(toks, np.minimum(bins, last), per_chunk)
        else:
            toks[end] += r.output_tokens
    starts = np.sort([r.send_time for r in sent])
    ends = np.sort([r.end_time for r in sent])
    mids = np.arange(n) * bin_s + widths / 2
    flight = np.searchsorted(starts, mids, "right") - np.searchsorted(ends, mids, "right")
    return Timeline(
        bin_s=bin_s,
        t=[i * bin_s for i in range(n)],
        completed_per_s=(done / widths).tolist(),
        output_tokens_per_s=(toks / widths).tolist(),
        in_flight=flight.tolist(),
    )


def achieved_rate(scheduled: Sequence[float], sent: Sequence[float]) -> float:
    """Requests per second that really went out: ``(n − 1)`` over the time from the
    first scheduled send to the last actual one. Late sends at the end lower it; a
    late first send does not raise it (as ``scheduled_rate`` of the send times would)."""
    if len(sent) < 2:
        return math.inf
    span = max(sent) - min(scheduled)
    return (len(sent) - 1) / span if span > 0 else math.inf


# ---- the summary ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BenchSummary:
    num_requests: int
    completed: int
    failed: int
    #: error type -> count
    errors: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    slos: dict[str, float]
    good_requests: int | None
    goodput: float | None
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    #: the rate asked for (inf = all at once), the schedule's, and the sends' (see
    #: ``achieved_rate``); ``achieved_rate_ratio`` = achieved / scheduled, ≤ 1
    requested_rate: float
    scheduled_rate: float
    achieved_rate: float
    achieved_rate_ratio: float
    #: how late requests went out against their schedule
    send_lag: Stats
    max_concurrency: int
    #: completed requests that produced fewer tokens than asked
    short_outputs: int


def summarize(
    records: Sequence[RequestRecord],
    duration: float,
    *,
    requested_rate: float = math.inf,
    slos: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> BenchSummary:
    ok = [r for r in records if r.success]
    errors = Counter(r.error or "unknown" for r in records if not r.success)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)
    sent = [r for r in records if not math.isnan(r.send_time)]
    sched = scheduled_rate([r.scheduled_time for r in sent])
    achieved = achieved_rate([r.scheduled_time for r in sent], [r.send_time for r in sent])
    ratio = achieved / sched if math.isfinite(sched) else math.nan  # nan: all at once
    good = sum(meets_slos(r, slos) for r in records) if slos else None
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return BenchSummary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(out_tokens),
        total_token_throughput=per_s(out_tokens + in_tokens),
        slos=dict(slos or {}),
        good_requests=good,
        goodput=per_s(good) if good is not None else None,
        ttft=stats((r.ttft for r in ok if r.ttft is not None), percentiles),
        tpot=stats((t for r in ok if (t := r.tpot) is not None), percentiles),
        itl=stats((g for r in ok for g in r.itls), percentiles),
        e2el=stats((r.latency for r in ok if r.latency is not None), percentiles),
        requested_rate=requested_rate,
        scheduled_rate=sched,
        achieved_rate=achieved,
        achieved_rate_ratio=ratio,
        send_lag=stats((r.send_time - r.scheduled_time for r in sent), percentiles),
        max_concurrency=max_in_flight(records),
        short_outputs=sum(r.output_tokens < r.output_len for r in ok),
    )
