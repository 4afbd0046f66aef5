"""When to send each request: pure functions from settings to send times.

A schedule is a list of offsets in seconds from the start of the run, one per
request, non-decreasing. The first request goes at 0 (as in ``vllm bench serve``).

- Poisson arrivals at ``rate`` requests/s: exponential gaps of mean ``1 / rate``.
- Burstiness: gaps drawn from a gamma distribution of shape ``burstiness`` and
  scale ``1 / (rate × burstiness)``, so the mean gap stays ``1 / rate`` and the
  variance is ``1 / (rate² × burstiness)``. ``burstiness == 1`` is Poisson; below 1
  requests come in bursts, above 1 they are more evenly spaced.
- A linear ramp moves the rate from ``start_rps`` to ``end_rps`` over the requests:
  request ``i`` of ``n`` is drawn at ``start + (end − start) × i / (n − 1)``.
- ``rate == inf`` sends everything at once.
- A trace gives the times itself; they are shifted to start at 0 and divided by a
  time scale (2 = replay twice as fast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmfleet.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RampUp:
    """A linear ramp of the request rate over the run, in requests per second."""

    start_rps: float
    end_rps: float

    def __post_init__(self) -> None:
        if not (self.start_rps > 0 and self.end_rps > 0):
            raise ConfigError(
                f"ramp-up: start and end rates must be positive, got "
                f"{self.start_rps} and {self.end_rps}"
            )
        if math.isinf(self.start_rps) or math.isinf(self.end_rps):
            raise ConfigError("ramp-up: start and end rates must be finite")


def request_rates(n: int, rate: float, ramp: RampUp | None = None) -> list[float]:
    """The rate in force for each of ``n`` requests."""
    if ramp is None:
        return [rate] * n
    if n == 1:
        return [ramp.start_rps]
    step = (ramp.end_rps - ramp.start_rps) / (n - 1)
    return [ramp.start_rps + step * i for i in range(n)]


def gamma_gaps(rates: Sequence[float], burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """One gap per rate: gamma of shape ``burstiness`` and mean ``1 / rate``.
    An infinite rate gives a zero gap."""
    if burstiness <= 0:
        raise ConfigError(f"burstiness: must be positive, got {burstiness}")
    r = np.asarray(rates, dtype=np.float64)
    if np.any(r <= 0):
        raise ConfigError("request-rate: must be positive (use inf to send all at once)")
    finite = np.isfinite(r)
    gaps = np.zeros(len(r))
    if finite.any():
        scale = 1.0 / (r[finite] * burstiness)
        gaps[finite] = rng.gamma(shape=burstiness, scale=scale)
    return gaps


def send_times(
    n: int,
    rate: float = math.inf,
    *,
    burstiness: float = 1.0,
    ramp: RampUp | None = None,
    seed: int = 0,
) -> list[float]:
    """Offsets (seconds from the start) at which to send ``n`` requests."""
    if n < 0:
        raise ConfigError(f"num-prompts: must be ≥ 0, got {n}")
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    # gap i separates request i from request i + 1, drawn at request i's rate
    gaps = gamma_gaps(request_rates(n, rate, ramp)[:-1], burstiness, rng)
    return [0.0, *np.cumsum(gaps).tolist()]


def trace_send_times(timestamps: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """A trace's timestamps as offsets from its first one, replayed ``time_scale``
    times faster."""
    if time_scale <= 0:
        raise ConfigError(f"trace-time-scale: must be positive, got {time_scale}")
    if not timestamps:
        return []
    t0 = timestamps[0]
    out = []
    prev = -math.inf
    for i, t in enumerate(timestamps):
        if t < prev:
            raise ConfigError(
                f"trace: timestamps must not decrease (line {i + 1}: {t} after {prev})"
            )
        prev = t
        out.append((t - t0) / time_scale)
    return out


def scheduled_rate(times: Sequence[float]) -> float:
    """Requests per second a schedule (or the actual send times) realises:
    ``(n − 1) / span``; inf when everything goes at once."""
    if len(times) < 2:
        return math.inf
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf
