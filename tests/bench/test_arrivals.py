from __future__ import annotations

import math

import numpy as np
import pytest

from lmfleet.bench.arrivals import (
    RampUp,
    gamma_gaps,
    request_rates,
    scheduled_rate,
    send_times,
    trace_send_times,
)
from lmfleet.errors import ConfigError


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_mean_and_variance(burstiness: float) -> None:
    rate = 20.0
    gaps = gamma_gaps([rate] * 200_000, burstiness, np.random.default_rng(1))
    # mean 1/rate whatever the burstiness; variance 1/(rate² × burstiness)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.var() == pytest.approx(1 / (rate**2 * burstiness), rel=0.05)


def test_poisson_arrivals() -> None:
    rate = 50.0
    times = np.asarray(send_times(100_001, rate, seed=3))
    assert times[0] == 0.0
    assert np.all(np.diff(times) >= 0)
    assert scheduled_rate(times.tolist()) == pytest.approx(rate, rel=0.01)
    # Poisson: counts in 1-second windows have mean = variance = rate
    counts = np.bincount(times.astype(np.int64))[:-1]
    assert counts.mean() == pytest.approx(rate, rel=0.02)
    assert counts.var() == pytest.approx(rate, rel=0.1)
    # exponential gaps: coefficient of variation 1
    gaps = np.diff(times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)


def test_burstier_means_clumpier() -> None:
    gaps = {b: np.diff(send_times(50_000, 10.0, burstiness=b, seed=0)) for b in (0.2, 1.0, 5.0)}
    cv = {b: g.std() / g.mean() for b, g in gaps.items()}
    assert cv[0.2] > cv[1.0] > cv[5.0]
    assert cv[0.2] == pytest.approx(math.sqrt(1 / 0.2), rel=0.05)


def test_seeded_and_infinite_rate() -> None:
    assert send_times(10, 5.0, seed=7) == send_times(10, 5.0, seed=7)
    assert send_times(10, 5.0, seed=7) != send_times(10, 5.0, seed=8)
    assert send_times(5) == [0.0] * 5
    assert send_times(0, 3.0) == []
    assert send_times(1, 3.0) == [0.0]


def test_ramp_schedule() -> None:
    assert request_rates(5, 1.0, RampUp(2.0, 10.0)) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert request_rates(1, 1.0, RampUp(2.0, 10.0)) == [2.0]
    assert request_rates(3, 7.0) == [7.0, 7.0, 7.0]
    n = 40_000
    times = np.asarray(send_times(n, ramp=RampUp(5.0, 50.0), seed=2))
    gaps = np.diff(times)
    first, last = gaps[: n // 20], gaps[-n // 20 :]
    # the first and last 5% of gaps run at about the start and end rates
    assert 1 / first.mean() == pytest.approx(5.0 + 45.0 * 0.025, rel=0.06)
    assert 1 / last.mean() == pytest.approx(50.0 - 45.0 * 0.025, rel=0.06)


def test_trace_times() -> None:
    assert trace_send_times([100.0, 100.5, 102.0], time_scale=2.0) == [0.0, 0.25, 1.0]
    assert trace_send_times([]) == []
    with pytest.raises(ConfigError, match="must not decrease"):
        trace_send_times([1.0, 0.5])


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="burstiness"):
        send_times(3, 1.0, burstiness=0)
    with pytest.raises(ConfigError, match="request-rate"):
        send_times(3, -1.0)
    with pytest.raises(ConfigError, match="ramp-up"):
        RampUp(0.0, 5.0)
    assert math.isinf(scheduled_rate([1.0]))
    assert math.isinf(scheduled_rate([2.0, 2.0]))
