from __future__ import annotations

import math

import pytest

from lmfleet.bench.metrics import (
    RequestRecord,
    goodput,
    max_in_flight,
    meets_slos,
    parse_slos,
    percentile,
    stats,
    summarize,
    timeline,
    tpot,
)
from lmfleet.errors import ConfigError


def rec(
    i: int,
    *,
    send: float = 0.0,
    ttft: float | None = 0.1,
    latency: float | None = 1.0,
    tokens: int = 10,
    ok: bool = True,
    error: str | None = None,
    chunks: list[float] | None = None,
    scheduled: float | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=i,
        scheduled_time=send if scheduled is None else scheduled,
        input_len=5,
        output_len=10,
        send_time=send,
        success=ok,
        error=error,
        ttft=ttft,
        latency=latency,
        output_tokens=tokens,
        chunk_times=chunks or [],
    )


def test_percentiles_interpolate_linearly() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))
    s = stats(values, (90, 99))
    assert (s.count, s.mean, s.median, s.min, s.max) == (100, 50.5, 50.5, 1.0, 100.0)
    assert s.p(90) == pytest.approx(90.1)
    assert s.to_dict(1000)["p99"] == pytest.approx(99010)
    empty = stats([])
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.p(99))


def test_tpot_and_itl() -> None:
    assert tpot(latency=1.1, ttft=0.1, output_tokens=11) == pytest.approx(0.1)
    assert tpot(latency=1.0, ttft=0.1, output_tokens=1) is None
    assert tpot(latency=None, ttft=0.1, output_tokens=5) is None
    r = rec(0, ttft=0.1, latency=0.4, tokens=4, chunks=[0.1, 0.15, 0.3, 0.4])
    assert r.itls == pytest.approx([0.05, 0.15, 0.1])
    assert r.tpot == pytest.approx(0.1)


def test_parse_slos() -> None:
    assert parse_slos(["ttft:500", "TPOT:50", "e2el:2000.5"]) == {
        "ttft": 0.5,
        "tpot": 0.05,
        "e2el": 2.0005,
    }
    for bad in ("ttft", "itl:5", "ttft:x", "ttft:-1"):
        with pytest.raises(ConfigError, match="goodput"):
            parse_slos([bad])


def test_goodput_counts_requests_meeting_every_slo() -> None:
    slos = {"ttft": 0.2, "tpot": 0.05}
    good = rec(0, ttft=0.1, latency=0.1 + 9 * 0.04, tokens=10)
    slow_first = rec(1, ttft=0.3, latency=0.3 + 9 * 0.04, tokens=10)
    slow_decode = rec(2, ttft=0.1, latency=0.1 + 9 * 0.06, tokens=10)
    one_token = rec(3, ttft=0.1, latency=0.1, tokens=1)  # TPOT undefined: not judged
    failed = rec(4, ok=False, error="http_503")
    records = [good, slow_first, slow_decode, one_token, failed]
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    assert goodput(records, slos, duration=4.0) == pytest.approx(0.5)
    assert goodput(records, {"e2el": 0.5}, duration=2.0) == pytest.approx(1.0)
    assert goodput(records, slos, duration=0.0) == 0.0


def test_max_in_flight() -> None:
    records = [
        rec(0, send=0.0, latency=1.0),
        rec(1, send=0.5, latency=1.0),
        rec(2, send=1.0, latency=1.0),  # starts as #0 ends: not counted together
        rec(3, send=1.2, latency=0.1),
    ]
    assert max_in_flight(records) == 3


def test_summary() -> None:
    records = [
        rec(
            i,
            send=0.1 * i,
            ttft=0.1,
            latency=1.0,
            tokens=10,
            chunks=[0.1 + 0.1 * k for k in range(10)],
        )
        for i in range(10)
    ]
    records.append(rec(10, send=1.0, ok=False, error="timeout", ttft=None, latency=None, tokens=0))
    records.append(rec(11, send=1.1, ok=False, error="http_503", ttft=None, latency=0.0, tokens=0))
    records[3].output_tokens = 5  # a short output
    s = summarize(records, duration=2.0, requested_rate=10.0, slos={"ttft": 0.5})
    assert (s.completed, s.failed, s.errors) == (10, 2, {"http_503": 1, "timeout": 1})
    assert s.total_output_tokens == 95
    assert s.request_throughput == pytest.approx(5.0)
    assert s.output_throughput == pytest.approx(47.5)
    assert s.goodput == pytest.approx(5.0) and s.good_requests == 10
    assert s.ttft.mean == pytest.approx(0.1)
    assert s.itl.median == pytest.approx(0.1)
    assert s.itl.count == 90
    assert s.short_outputs == 1
    assert s.achieved_rate == pytest.approx(10.0)
    assert s.achieved_rate_ratio == pytest.approx(1.0)
    # sends that ran late: achieved rate is lower than the schedule's
    late = [rec(i, send=0.2 * i, scheduled=0.1 * i) for i in range(5)]
    s = summarize(late, duration=2.0)
    assert s.achieved_rate_ratio == pytest.approx(0.5)
    assert s.send_lag.max == pytest.approx(0.4)
    # a late first send alone does not make the rate look higher than asked
    first_late = [rec(i, send=max(0.1 * i, 0.2), scheduled=0.1 * i) for i in range(5)]
    assert summarize(first_late, duration=2.0).achieved_rate_ratio == pytest.approx(1.0)
    assert summarize([], duration=0.0).completed == 0


def test_timeline_bins() -> None:
    records = [
        rec(0, send=0.0, latency=1.5, tokens=4, chunks=[0.2, 0.6, 1.2, 1.5]),
        rec(1, send=1.0, latency=1.5, tokens=2, chunks=[0.5, 1.5]),  # ends at 2.5
        rec(2, send=0.5, ok=False, error="timeout", latency=0.2, tokens=0),
    ]
    tl = timeline(records, duration=3.0, bin_s=1.0)
    assert tl.t == [0.0, 1.0, 2.0]
    assert tl.completed_per_s == [0.0, 1.0, 1.0]
    assert tl.output_tokens_per_s == [2.0, 3.0, 1.0]
    assert tl.in_flight == [2, 1, 0]  # at 0.5 s, 1.5 s, 2.5 s: ends are exclusive
    # a last bin of half a second: its rates are per second of its own length
    tl = timeline(records, duration=2.5, bin_s=1.0)
    assert tl.completed_per_s == [0.0, 1.0, 2.0]
