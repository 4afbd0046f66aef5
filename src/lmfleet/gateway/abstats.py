"""Per-version A/B statistics: samples, comparisons and a JSON-ready report.

Boundary: plain numbers in, plain numbers out. The gateway records each request's
latencies and outcome into a :class:`VersionSamples` per (model, version); the
admin API and the rollout controller read :func:`compare` and :func:`report`.

Methods (no scipy; everything below is implemented here with ``math`` and numpy):

- Latencies (TTFT, TPOT, end-to-end) and feedback scores: Welch's unequal-variance
  t-test for the difference of means ``b - a``, with Welch–Satterthwaite degrees of
  freedom. The Student-t distribution function is the regularized incomplete beta
  function, evaluated with its continued fraction (Numerical Recipes ``betacf``,
  modified Lentz); quantiles invert it with Newton's method started at the normal
  quantile (monotone convergence, the t CDF being concave above 0). Beyond 10^6
  degrees of freedom the normal distribution is used (they differ by < 1e-6).
- Error rate: the two-proportion z-test with pooled variance for the p-value, and
  Newcombe's hybrid score interval (his method 10, built from two Wilson intervals)
  for the difference ``rate_b - rate_a``. Unlike the Wald interval it stays inside
  [-1, 1] and behaves with zero errors on a side, the usual case for a good version.
- Percentiles p50/p90/p99: numpy's linear interpolation. Their confidence interval
  (:func:`quantile_interval`) is distribution-free: a pair of order statistics whose
  ranks cover the quantile's with the binomial probability asked for (normal
  approximation of the binomial, with a continuity margin of one rank). The ratio of
  two versions' quantiles (:func:`quantile_ratio_interval`) combines the two
  intervals, each at ``1 - (1 - confidence) / 2`` (Bonferroni), so the ratio's
  interval covers the true ratio with at least ``confidence``.
- Samples with no variance on either side get no t-test (p-value and interval are
  None): a zero-width interval and p = 0 from constant samples would claim a
  certainty the data cannot give.

Memory is bounded: each metric keeps the last ``capacity`` values (10,000 by
default) in a ring buffer; the request and error counters are cumulative.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

#: values kept per metric and version
DEFAULT_CAPACITY = 10_000
#: the percentiles reported per metric
PERCENTILES = (50, 90, 99)
#: the metrics compared with Welch's t-test
MEAN_METRICS = ("ttft", "tpot", "e2e", "feedback")

_NORMAL = NormalDist()
_BETACF_EPS = 1e-15
_BETACF_MAX_ITER = 10_000
_NORMAL_DF = 1e6


# -- samples -------------------------------------------------------------------------


@dataclass(slots=True)
class VersionSamples:
    """What was observed of one version: bounded latency and feedback buffers, and
    cumulative request and error counts. Any iterable is accepted for the buffers."""

    ttft: Iterable[float] = ()
    tpot: Iterable[float] = ()
    e2e: Iterable[float] = ()
    feedback: Iterable[float] = ()
    errors: int = 0
    total: int = 0
    capacity: int = DEFAULT_CAPACITY

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {self.capacity}")
        for name in MEAN_METRICS:
            setattr(self, name, deque(getattr(self, name), maxlen=self.capacity))

    def record(
        self,
        *,
        ttft: float | None = None,
        tpot: float | None = None,
        e2e: float | None = None,
        error: bool = False,
    ) -> None:
        """One finished request. TPOT is None for single-token outputs; a failed
        request usually has no latencies."""
        self.total += 1
        self.errors += int(error)
        for name, value in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
            if value is not None:
                self.values(name).append(float(value))

    def record_feedback(self, score: float) -> None:
        """A user's score for a response (e.g. thumbs up 1, down 0)."""
        self.values("feedback").append(float(score))

    def values(self, metric: str) -> deque[float]:
        """The buffer of ``metric`` (one of ``MEAN_METRICS``)."""
        if metric not in MEAN_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {MEAN_METRICS}")
        buf: deque[float] = getattr(self, metric)
        return buf

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.total if self.total else None

    def percentile(self, metric: str, q: float) -> float | None:
        """The ``q``-th percentile (0..100) of ``metric``; None without samples."""
        values = self.values(metric)
        return float(np.percentile(np.fromiter(values, float), q)) if values else None


# -- results -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeanComparison:
    """Welch's t-test of mean(b) - mean(a); statistics None with < 2 samples a side."""

    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    rel_diff: float | None  # diff / mean_a
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    t: float | None
    df: float | None


@dataclass(frozen=True, slots=True)
class ProportionComparison:
    """Error rate b - a: pooled two-proportion z-test, Newcombe hybrid score CI."""

    n_a: int
    n_b: int
    errors_a: int
    errors_b: int
    rate_a: float | None
    rate_b: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    z: float | None


@dataclass(frozen=True, slots=True)
class Comparison:
    """Version b against version a (the baseline), every difference as b - a."""

    confidence: float
    ttft: MeanComparison
    tpot: MeanComparison
    e2e: MeanComparison
    feedback: MeanComparison
    error_rate: ProportionComparison
    percentiles_a: dict[str, dict[str, float | None]] = field(default_factory=dict)
    percentiles_b: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and infinities become None."""
        return _json_safe(asdict(self))


# -- public API ----------------------------------------------------------------------


def compare(a: VersionSamples, b: VersionSamples, confidence: float = 0.95) -> Comparison:
    """Compare version ``b`` with the baseline ``a`` at ``confidence`` (two-sided)."""
    _check_confidence(confidence)
    means = {m: welch(list(a.values(m)), list(b.values(m)), confidence) for m in MEAN_METRICS}
    return Comparison(
        confidence=confidence,
        error_rate=two_proportions(a.errors, a.total, b.errors, b.total, confidence),
        percentiles_a=percentile_table(a),
        percentiles_b=percentile_table(b),
        **means,
    )


def report(
    samples_by_version: dict[str, VersionSamples], baseline: str, confidence: float = 0.95
) -> dict[str, Any]:
    """The A/B report for the admin API: a summary per version and every other
    version compared with ``baseline``. JSON-ready."""
    if baseline not in samples_by_version:
        known = ", ".join(sorted(samples_by_version)) or "none"
        raise ValueError(f"baseline {baseline!r} has no samples; versions: {known}")
    base = samples_by_version[baseline]
    return _json_safe(
        {
            "baseline": baseline,
            "confidence": confidence,
            "versions": {name: summarize(s) for name, s in samples_by_version.items()},
            "comparisons": {
                name: compare(base, s, confidence).to_dict()
                for name, s in samples_by_version.items()
                if name != baseline
            },
        }
    )


def summarize(samples: VersionSamples) -> dict[str, Any]:
    """Counts, error rate and, per metric, n, mean and percentiles."""
    out: dict[str, Any] = {
        "requests": samples.total,
        "errors": samples.errors,
        "error_rate": samples.error_rate,
    }
    table = percentile_table(samples)
    for metric in MEAN_METRICS:
        values = samples.values(metric)
        mean = math.fsum(values) / len(values) if values else None
        out[metric] = {"n": len(values), "mean": mean, **table[metric]}
    return out


def percentile_table(samples: VersionSamples) -> dict[str, dict[str, float | None]]:
    """``{metric: {"p50": .., "p90": .., "p99": ..}}``, None where there are no samples."""
    table: dict[str, dict[str, float | None]] = {}
    for metric in MEAN_METRICS:
        values = samples.values(metric)
        if values:
            qs = np.percentile(np.fromiter(values, float), PERCENTILES)
            table[metric] = {f"p{p}": float(q) for p, q in zip(PERCENTILES, qs, strict=True)}
        else:
            table[metric] = {f"p{p}": None for p in PERCENTILES}
    return table


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> MeanComparison:
    """Welch's t-test and confidence interval for mean(b) - mean(a)."""
    _check_confidence(confidence)
    na, nb = len(a), len(b)
    mean_a = math.fsum(a) / na if na else None
    mean_b = math.fsum(b) / nb if nb else None
    diff = mean_b - mean_a if mean_a is not None and mean_b is not None else None
    rel = diff / mean_a if diff is not None and mean_a else None
    if na < 2 or nb < 2 or diff is None:
        return MeanComparison(na, nb, mean_a, mean_b, diff, rel, None, None, None, None, None)
    va = float(np.var(np.asarray(a, float), ddof=1)) / na
    vb = float(np.var(np.asarray(b, float), ddof=1)) / nb
    se = math.sqrt(va + vb)
    if se == 0.0:
        # both sides constant: no variance to test against. A p-value of 0 and a
        # zero-width interval would claim certainty from as few as two samples per
        # side (a coarse timer, scores that are all 1); report no test instead
        return MeanComparison(na, nb, mean_a, mean_b, diff, rel, None, None, None, None, None)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    t = diff / se
    p = 2.0 * student_t_sf(abs(t), df)
    half = student_t_ppf(0.5 + confidence / 2.0, df) * se
    return MeanComparison(na, nb, mean_a, mean_b, diff, rel, diff - half, diff + half, p, t, df)


def quantile_interval(
    values: Sequence[float], q: float, confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval for the ``q``-quantile (0 < q < 1) of the
    distribution ``values`` were drawn from: the order statistics whose ranks bracket
    ``n q`` by ``z sqrt(n q (1 - q))`` plus one rank. None with fewer than 2 values."""
    _check_confidence(confidence)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    n = len(values)
    if n < 2:
        return None
    ordered = sorted(values)
    z = _NORMAL.inv_cdf(0.5 + confidence / 2.0)
    half = z * math.sqrt(n * q * (1.0 - q)) + 1.0
    lo = max(0, math.floor(n * q - half))
    hi = min(n - 1, math.ceil(n * q + half) - 1)
    return float(ordered[lo]), float(ordered[hi])


def quantile_ratio_interval(
    a: Sequence[float], b: Sequence[float], q: float, confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """(point, low, high) for quantile_q(b) / quantile_q(a), the interval covering
    the true ratio with at least ``confidence``. None with fewer than 2 values on a
    side or a quantile of ``a`` that is not positive (latencies are)."""
    each = 1.0 - (1.0 - confidence) / 2.0
    ia, ib = quantile_interval(a, q, each), quantile_interval(b, q, each)
    if ia is None or ib is None:
        return None
    qa = float(np.percentile(np.asarray(a, float), q * 100.0))
    qb = float(np.percentile(np.asarray(b, float), q * 100.0))
    if qa <= 0.0 or ia[0] <= 0.0:
        return None
    return qb / qa, ib[0] / ia[1], ib[1] / ia[0]


def two_proportions(
    errors_a: int, n_a: int, errors_b: int, n_b: int, confidence: float = 0.95
) -> ProportionComparison:
    """Pooled two-proportion z-test and Newcombe hybrid score CI for rate_b - rate_a."""
    _check_confidence(confidence)
    if not (0 <= errors_a <= n_a and 0 <= errors_b <= n_b):
        raise ValueError(f"need 0 <= errors <= n, got {errors_a}/{n_a} and {errors_b}/{n_b}")
    rate_a = errors_a / n_a if n_a else None
    rate_b = errors_b / n_b if n_b else None
    if rate_a is None or rate_b is None:
        return ProportionComparison(
            n_a, n_b, errors_a, errors_b, rate_a, rate_b, None, None, None, None, None
        )
    diff = rate_b - rate_a
    pooled = (errors_a + errors_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0.0:  # no errors anywhere, or only errors: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    lo_a, hi_a = wilson_interval(errors_a, n_a, confidence)
    lo_b, hi_b = wilson_interval(errors_b, n_b, confidence)
    ci_low = diff - math.sqrt((rate_b - lo_b) ** 2 + (hi_a - rate_a) ** 2)
    ci_high = diff + math.sqrt((hi_b - rate_b) ** 2 + (rate_a - lo_a) ** 2)
    return ProportionComparison(
        n_a, n_b, errors_a, errors_b, rate_a, rate_b, diff, ci_low, ci_high, p, z
    )


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n."""
    if n <= 0:
        raise ValueError(f"need n > 0, got {n}")
    z = _NORMAL.inv_cdf(0.5 + confidence / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)  # exact at the ends, no rounding dust
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


# -- Student's t distribution ----------------------------------------------------------


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if df >= _NORMAL_DF:
        return 1.0 - _NORMAL.cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return 1.0 - student_t_sf(t, df)


def student_t_pdf(t: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def student_t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (Newton's method from the normal quantile)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    z = _NORMAL.inv_cdf(p)
    if df >= _NORMAL_DF:
        return z
    t = z  # below the root: the t quantile exceeds the normal one, and on t > 0 the
    # CDF is concave, so every Newton step stays below the root and moves towards it
    for _ in range(200):
        step = (p - student_t_cdf(t, df)) / student_t_pdf(t, df)
        t += step
        if abs(step) <= 1e-12 * max(1.0, abs(t)):
            break
    return t


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0, 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _BETACF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _BETACF_EPS:
            return h
    return h  # not converged to full precision: still far more than the report needs


# -- helpers -------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
