"""A/B statistics: the t distribution, Welch's test, two proportions, reports."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from lmfleet.gateway.abstats import (
    VersionSamples,
    betainc,
    compare,
    quantile_interval,
    quantile_ratio_interval,
    report,
    student_t_cdf,
    student_t_ppf,
    student_t_sf,
    two_proportions,
    welch,
    wilson_interval,
)

# Wikipedia, "Welch's t-test", example 1 (two samples of 15): t = 2.46, df ≈ 25.0, p = 0.021
WIKI_A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
WIKI_A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


# -- the t distribution ------------------------------------------------------------------


@pytest.mark.parametrize("t", [-5.0, -1.3, -0.2, 0.0, 0.7, 2.0, 40.0])
def test_t_cdf_matches_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize(
    ("p", "df", "expected"),  # printed t tables
    [
        (0.975, 1, 12.7062047361747),
        (0.975, 10, 2.228138851986),
        (0.975, 30, 2.042272456301),
        (0.95, 5, 2.015048373333),
        (0.995, 3, 5.840909309733),
        (0.025, 10, -2.228138851986),
    ],
)
def test_t_quantiles_match_tables(p, df, expected):
    assert student_t_ppf(p, df) == pytest.approx(expected, rel=1e-9)
    assert student_t_cdf(expected, df) == pytest.approx(p, abs=1e-12)


def test_t_tends_to_the_normal():
    assert student_t_ppf(0.975, 1e5) == pytest.approx(1.959963985, abs=1e-4)
    assert student_t_ppf(0.975, 1e7) == pytest.approx(1.959963985, abs=1e-8)
    assert 2 * student_t_sf(1.959963985, 1e7) == pytest.approx(0.05, abs=1e-8)


def test_incomplete_beta_identities():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1.0, 1.0, x) == pytest.approx(x)
        assert betainc(3.0, 1.0, x) == pytest.approx(x**3)
        assert betainc(2.5, 4.0, x) == pytest.approx(1.0 - betainc(4.0, 2.5, 1.0 - x), abs=1e-14)
    with pytest.raises(ValueError):
        betainc(1.0, 1.0, 1.5)


# -- Welch's t-test ----------------------------------------------------------------------


def test_welch_matches_the_textbook_example():
    r = welch(WIKI_A1, WIKI_A2)
    assert r.mean_a == pytest.approx(20.82)
    assert r.mean_b == pytest.approx(22.98667, abs=1e-5)
    assert r.t == pytest.approx(2.46, abs=0.005)
    assert r.df == pytest.approx(24.99, abs=0.01)
    assert r.p_value == pytest.approx(0.021, abs=0.0005)
    # hand computation from the same formulas, and the interval is centred on diff
    va, vb = np.var(WIKI_A1, ddof=1) / 15, np.var(WIKI_A2, ddof=1) / 15
    assert r.t == pytest.approx((r.mean_b - r.mean_a) / math.sqrt(va + vb))
    half = student_t_ppf(0.975, r.df) * math.sqrt(va + vb)
    assert (r.ci_low, r.ci_high) == pytest.approx((r.diff - half, r.diff + half))
    assert r.ci_low > 0  # p < 0.05 ⇔ the 95 % interval excludes 0


def test_welch_is_antisymmetric_and_handles_small_and_constant_samples():
    ab, ba = welch(WIKI_A1, WIKI_A2), welch(WIKI_A2, WIKI_A1)
    assert ba.diff == pytest.approx(-ab.diff) and ba.p_value == pytest.approx(ab.p_value)
    few = welch([1.0], [2.0, 3.0])
    assert few.diff == pytest.approx(1.5) and few.p_value is None and few.ci_low is None
    empty = welch([], [])
    assert empty.mean_a is None and empty.diff is None
    # no variance on either side: no test, not p = 0 with a zero-width interval
    same = welch([2.0, 2.0], [2.0, 2.0, 2.0])
    assert (same.diff, same.p_value, same.ci_low, same.ci_high) == (0.0, None, None, None)
    apart = welch([2.0, 2.0], [3.0, 3.0])
    assert apart.diff == 1.0 and (apart.p_value, apart.ci_low, apart.ci_high) == (None,) * 3
    one_side = welch([2.0, 2.0, 2.0], [2.5, 3.0, 3.5])  # the other side's variance suffices
    assert one_side.p_value is not None and one_side.ci_low < one_side.ci_high


def test_quantile_interval_covers_the_p90_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    true_p90 = float(np.exp(0.5 * 1.2815515655446004))  # log-normal(0, 0.5)
    for n in (30, 200):
        covered = 0
        for _ in range(1000):
            lo, hi = quantile_interval(rng.lognormal(0.0, 0.5, size=n).tolist(), 0.9)
            covered += lo <= true_p90 <= hi
        assert covered / 1000 >= 0.94, n


def test_quantile_ratio_interval():
    a = [1.0 + i / 100 for i in range(100)]
    point, lo, hi = quantile_ratio_interval(a, [2 * x for x in a], 0.9)
    assert point == pytest.approx(2.0) and lo < 2.0 < hi
    assert quantile_ratio_interval([1.0], a, 0.9) is None
    assert quantile_ratio_interval([0.0] * 10, a, 0.9) is None
    const = quantile_ratio_interval([0.5] * 10, [0.5] * 10, 0.9)
    assert const == (1.0, 1.0, 1.0)


def test_welch_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    trials, covered, rejected = 1000, 0, 0
    for _ in range(trials):
        a = rng.normal(1.0, 0.5, size=8)
        b = rng.normal(1.3, 2.0, size=15)  # unequal variances and sizes: Welch's case
        r = welch(a.tolist(), b.tolist())
        covered += r.ci_low <= 0.3 <= r.ci_high
        null = welch(a.tolist(), (b - 0.3).tolist())
        rejected += null.p_value < 0.05
    assert 0.935 <= covered / trials <= 0.965
    assert 0.035 <= rejected / trials <= 0.065


# -- proportions -------------------------------------------------------------------------


def test_newcombe_interval_matches_the_paper():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 vs 48/80,
    # method 10 (hybrid score): 0.0524 to 0.3339
    r = two_proportions(48, 80, 56, 70)
    assert r.diff == pytest.approx(0.2)
    assert r.ci_low == pytest.approx(0.0524, abs=5e-5)
    assert r.ci_high == pytest.approx(0.3339, abs=5e-5)
    # pooled z: p = 104/150, se = sqrt(p(1-p)(1/80 + 1/70))
    pooled = 104 / 150
    z = 0.2 / math.sqrt(pooled * (1 - pooled) * (1 / 80 + 1 / 70))
    assert r.z == pytest.approx(z) and z == pytest.approx(2.650, abs=1e-3)
    assert r.p_value == pytest.approx(math.erfc(z / math.sqrt(2)))


def test_wilson_interval_with_no_events():
    low, high = wilson_interval(0, 10)
    z2 = 1.959963985**2
    assert low == 0.0 and high == pytest.approx(z2 / (10 + z2))


def test_proportions_without_errors_or_without_requests():
    none = two_proportions(0, 500, 0, 500)
    assert none.p_value == 1.0 and none.ci_low < 0 < none.ci_high
    empty = two_proportions(0, 0, 1, 10)
    assert empty.rate_a is None and empty.p_value is None
    with pytest.raises(ValueError):
        two_proportions(5, 4, 0, 10)


def test_newcombe_interval_coverage_is_near_95_percent():
    rng = random.Random(7)
    trials, covered = 2000, 0
    for _ in range(trials):
        ka = sum(rng.random() < 0.02 for _ in range(400))
        kb = sum(rng.random() < 0.05 for _ in range(300))
        r = two_proportions(ka, 400, kb, 300)
        covered += r.ci_low <= 0.03 <= r.ci_high
    assert 0.93 <= covered / trials <= 0.97


# -- samples and reports -----------------------------------------------------------------


def test_samples_are_bounded_and_counts_cumulative():
    s = VersionSamples(capacity=5)
    for i in range(12):
        s.record(ttft=float(i), tpot=0.01 * i, e2e=1.0 + i, error=i % 4 == 0)
    s.record(error=True)  # a failure has no latencies
    s.record_feedback(1.0)
    assert list(s.values("ttft")) == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert (s.total, s.errors) == (13, 4)
    assert s.error_rate == pytest.approx(4 / 13)
    assert s.percentile("ttft", 50) == 9.0
    assert s.percentile("feedback", 90) == 1.0
    assert VersionSamples().percentile("e2e", 50) is None
    with pytest.raises(ValueError, match="unknown metric"):
        s.values("itl")
    assert len(VersionSamples(ttft=range(20_000)).ttft) == 10_000


def test_compare_and_report_are_json_ready():
    rng = np.random.default_rng(0)
    a = VersionSamples(
        ttft=rng.gamma(2.0, 0.1, 500), tpot=rng.normal(0.02, 0.002, 500), errors=5, total=500
    )
    b = VersionSamples(
        ttft=rng.gamma(2.0, 0.12, 400), tpot=rng.normal(0.02, 0.002, 400), errors=12, total=400
    )
    b.record_feedback(1.0)
    c = compare(a, b)
    assert c.ttft.diff == pytest.approx(np.mean(b.ttft) - np.mean(a.ttft))
    assert c.ttft.p_value < 0.01
    assert c.error_rate.rate_b == pytest.approx(0.03)
    assert c.feedback.n_b == 1 and c.feedback.p_value is None
    assert set(c.percentiles_b["ttft"]) == {"p50", "p90", "p99"}

    r = report({"v1": a, "v2": b, "v3": VersionSamples()}, baseline="v1")
    text = json.dumps(r, allow_nan=False)  # no NaN, no numpy types
    assert json.loads(text) == r
    assert set(r["comparisons"]) == {"v2", "v3"}
    assert r["versions"]["v1"]["ttft"]["n"] == 500
    assert r["versions"]["v3"]["error_rate"] is None
    assert r["comparisons"]["v3"]["ttft"]["p_value"] is None
    assert r["comparisons"]["v2"]["error_rate"]["diff"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="baseline 'v9' has no samples"):
        report({"v1": a}, baseline="v9")
    with pytest.raises(ValueError, match="confidence"):
        compare(a, b, confidence=95)
