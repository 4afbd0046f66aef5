"""Progressive rollout of a candidate version with automatic rollback.

Boundary: a small state machine over a plan, the time the caller passes in, and the
two versions' :class:`~lmfleet.gateway.abstats.VersionSamples`. It decides; the
caller applies the decision by setting the candidate's traffic weight (a percentage,
0..100; the baseline gets the rest). No I/O, no clock of its own.

Each call to :meth:`Rollout.evaluate`:

1. Judges the SLOs once both versions have ``min_samples_for_judgement`` samples of a
   metric (requests, for the error rate): the candidate is rolled back (weight 0) if
   its error rate exceeds the baseline's by more than ``max_error_rate_increase``
   (absolute, 0.01 = one percentage point), or its TTFT or TPOT p90 exceeds the
   baseline's times ``max_ttft_p90_ratio`` / ``max_tpot_p90_ratio``.
2. Otherwise holds until the current step has seen ``min_requests`` candidate
   requests and lasted ``min_duration_s`` *and* the SLOs could be judged (it never
   advances blind), then advances to the next step, or completes (weight 100) after
   the last one.

Thresholds, not significance tests: the rollout must act on a bounded number of
samples, and a rollback is cheap. The A/B report (``abstats.compare``) carries the
p-values and confidence intervals for people.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmfleet.errors import ConfigError
from lmfleet.gateway.abstats import VersionSamples

Action = Literal["hold", "advance", "complete", "rollback"]
Status = Literal["running", "completed", "rolled_back"]

#: candidate weights of the default plan, in percent
DEFAULT_STEP_WEIGHTS = (5.0, 25.0, 50.0, 100.0)


@dataclass(frozen=True, slots=True)
class RolloutStep:
    """Send ``weight`` percent of traffic to the candidate until both gates pass."""

    weight: float
    min_requests: int
    min_duration_s: float


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    """The steps and the SLO guard rails of one rollout."""

    candidate: str
    baseline: str
    steps: tuple[RolloutStep, ...]
    max_error_rate_increase: float = 0.01
    max_ttft_p90_ratio: float = 1.5
    max_tpot_p90_ratio: float = 1.5
    min_samples_for_judgement: int = 100

    def __post_init__(self) -> None:
        if self.candidate == self.baseline:
            raise ConfigError(f"rollout candidate and baseline are both {self.candidate!r}")
        if not self.steps:
            raise ConfigError("rollout plan has no steps: give at least one, e.g. weight 100")
        previous = 0.0
        for i, s in enumerate(self.steps):
            if not 0.0 < s.weight <= 100.0 or s.weight < previous:
                raise ConfigError(
                    f"steps[{i}].weight: must be in (0, 100] and not below the previous "
                    f"step's, got {s.weight}"
                )
            if s.min_requests < 0 or s.min_duration_s < 0:
                raise ConfigError(f"steps[{i}]: min_requests and min_duration_s must be >= 0")
            previous = s.weight
        if self.max_error_rate_increase < 0:
            raise ConfigError("max_error_rate_increase must be >= 0")
        if self.max_ttft_p90_ratio <= 0 or self.max_tpot_p90_ratio <= 0:
            raise ConfigError("max_ttft_p90_ratio and max_tpot_p90_ratio must be > 0")
        if self.min_samples_for_judgement < 1:
            raise ConfigError("min_samples_for_judgement must be >= 1")

    @classmethod
    def default(
        cls, candidate: str, baseline: str, min_requests: int = 200, min_duration_s: float = 300.0
    ) -> RolloutPlan:
        """5 % → 25 % → 50 % → 100 %, each for ``min_requests`` and ``min_duration_s``."""
        steps = tuple(RolloutStep(w, min_requests, min_duration_s) for w in DEFAULT_STEP_WEIGHTS)
        return cls(candidate, baseline, steps)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the caller should do now, and why. ``at`` is the caller's time."""

    action: Action
    step_index: int
    candidate_weight: float
    reason: str
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "step_index": self.step_index,
            "candidate_weight": self.candidate_weight,
            "reason": self.reason,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A snapshot for the admin API."""

    candidate: str
    baseline: str
    status: Status
    step_index: int
    candidate_weight: float
    started_at: float
    step_started_at: float
    step_start_requests: int
    last_decision: Decision | None
    history: tuple[Decision, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "baseline": self.baseline,
            "status": self.status,
            "step_index": self.step_index,
            "candidate_weight": self.candidate_weight,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "step_start_requests": self.step_start_requests,
            "last_decision": None if self.last_decision is None else self.last_decision.to_dict(),
            "history": [d.to_dict() for d in self.history],
        }


class Rollout:
    """One rollout in progress. ``history`` keeps the transitions (advance, complete,
    rollback), not every hold; ``last_decision`` is the latest of any kind."""

    def __init__(self, plan: RolloutPlan, now: float, candidate_requests: int = 0) -> None:
        """``candidate_requests``: the candidate's request count at the start, when its
        samples are not fresh (the first step counts requests from there)."""
        self.plan = plan
        self.started_at = now
        self.status: Status = "running"
        self.step_index = 0
        self.step_started_at = now
        self.step_start_requests = candidate_requests
        self.last_decision: Decision | None = None
        self.history: list[Decision] = []

    @property
    def candidate_weight(self) -> float:
        if self.status == "rolled_back":
            return 0.0
        if self.status == "completed":
            return 100.0
        return self.plan.steps[self.step_index].weight

    @property
    def state(self) -> RolloutState:
        return RolloutState(
            candidate=self.plan.candidate,
            baseline=self.plan.baseline,
            status=self.status,
            step_index=self.step_index,
            candidate_weight=self.candidate_weight,
            started_at=self.started_at,
            step_started_at=self.step_started_at,
            step_start_requests=self.step_start_requests,
            last_decision=self.last_decision,
            history=tuple(self.history),
        )

    def evaluate(self, now: float, baseline: VersionSamples, candidate: VersionSamples) -> Decision:
        """Judge the SLOs and the current step's gates; see the module docstring.

        Once completed or rolled back it keeps returning that final decision.
        """
        if self.status != "running" and self.last_decision is not None:
            return self.last_decision
        breach = slo_breach(self.plan, baseline, candidate)
        if breach is not None:
            return self._rollback(now, breach)
        waiting = self._gates_pending(now, baseline, candidate)
        if waiting:
            return self._decide("hold", now, "; ".join(waiting))
        return self._next_step(now, candidate)

    def rollback(self, now: float, reason: str) -> Decision:
        """Roll back by hand (admin API). No effect once completed or rolled back."""
        if self.status != "running" and self.last_decision is not None:
            return self.last_decision
        return self._rollback(now, f"manual: {reason}")

    # -- internals -----------------------------------------------------------------

    def _gates_pending(
        self, now: float, baseline: VersionSamples, candidate: VersionSamples
    ) -> list[str]:
        step = self.plan.steps[self.step_index]
        pending = []
        seen = candidate.total - self.step_start_requests
        if seen < step.min_requests:
            pending.append(f"{seen}/{step.min_requests} candidate requests this step")
        elapsed = now - self.step_started_at
        if elapsed < step.min_duration_s:
            pending.append(f"{elapsed:.0f}/{step.min_duration_s:.0f} s this step")
        need = self.plan.min_samples_for_judgement
        have = min(candidate.total, baseline.total)
        if have < need:
            pending.append(f"{have}/{need} requests on each version before judging SLOs")
        return pending

    def _next_step(self, now: float, candidate: VersionSamples) -> Decision:
        last = len(self.plan.steps) - 1
        if self.step_index == last:
            self.status = "completed"
            return self._decide("complete", now, f"step {last} passed with SLOs met")
        self.step_index += 1
        self.step_started_at = now
        self.step_start_requests = candidate.total
        return self._decide("advance", now, f"step {self.step_index - 1} passed with SLOs met")

    def _rollback(self, now: float, reason: str) -> Decision:
        self.status = "rolled_back"
        return self._decide("rollback", now, reason)

    def _decide(self, action: Action, now: float, reason: str) -> Decision:
        decision = Decision(action, self.step_index, self.candidate_weight, reason, now)
        self.last_decision = decision
        if action != "hold":
            self.history.append(decision)
        return decision


def slo_breach(
    plan: RolloutPlan, baseline: VersionSamples, candidate: VersionSamples
) -> str | None:
    """Why the candidate breaks the plan's SLOs, or None if it does not (or cannot
    be judged yet). Each metric is judged once both sides have enough samples."""
    need = plan.min_samples_for_judgement
    if baseline.total >= need and candidate.total >= need:
        base_rate = baseline.errors / baseline.total
        cand_rate = candidate.errors / candidate.total
        if cand_rate - base_rate > plan.max_error_rate_increase:
            return (
                f"error rate {cand_rate:.2%} vs baseline {base_rate:.2%}: more than "
                f"{plan.max_error_rate_increase:.2%} higher"
            )
    for metric, ratio in (("ttft", plan.max_ttft_p90_ratio), ("tpot", plan.max_tpot_p90_ratio)):
        if len(baseline.values(metric)) < need or len(candidate.values(metric)) < need:
            continue
        base_p90 = baseline.percentile(metric, 90)
        cand_p90 = candidate.percentile(metric, 90)
        if base_p90 is not None and cand_p90 is not None and cand_p90 > base_p90 * ratio:
            return (
                f"{metric.upper()} p90 {cand_p90:.4g} s vs baseline {base_p90:.4g} s: "
                f"above {ratio:g}x"
            )
    return None
