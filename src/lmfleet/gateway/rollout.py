"""Progressive rollout of a candidate version with automatic rollback.

Boundary: a small state machine over a plan, the time the caller passes in, and the
samples of the current step (a :class:`StepWindow`). It decides; the caller applies
the decision by setting the candidate's traffic weight (a percentage, 0..100; the
baseline gets the rest) and feeds the window. No I/O, no clock of its own, no
randomness: the same samples give the same decisions, live and in simulation.

**What is judged.** Each step has its own window: baseline and candidate samples
from the same span of time, only of requests the weighted split assigned (the
caller leaves out pinned requests and shadow copies), so old history neither
triggers a rollback nor dilutes a new regression. A step at 100 % sends the
baseline nothing; it is judged against the baseline samples of the step before it
(a plan's first step must therefore be below 100 %).

**How.** Once both sides of the window have ``min_samples_for_judgement`` requests:

- Latency (TTFT, TPOT and end-to-end, each once both sides have that many values of
  it): the ratio candidate p90 / baseline p90 with a distribution-free interval
  (:func:`~lmfleet.gateway.abstats.quantile_ratio_interval`). The whole
  *rollback* interval above the limit (``max_*_p90_ratio``) rolls back; the whole
  ``confidence`` interval at or below it passes; otherwise the evidence is
  inconclusive and the step holds, collecting more samples, so neither an identical
  candidate is rolled back by noise nor a slow one promoted by it.
- Error rate: the difference candidate − baseline with Newcombe's interval. The
  whole rollback interval above ``max_error_rate_increase`` rolls back; a
  difference at or below the limit passes; one above it, not clearly, holds.
  (Passing on the point estimate, not the interval: showing with confidence that a
  rate rose by less than one point takes several hundred samples a side.)

A step advances (or, the last one, completes) once every judged metric passes and
its gates are met: ``min_requests`` candidate requests and ``min_duration_s`` in
this step. It never advances blind: without enough samples it holds.

The window is judged every time the caller evaluates (every second), so that a bad
candidate is rolled back early. Repeated looks at the same growing data would turn
a 5 % chance of a false alarm per look into a near certainty over a step, so a
rollback needs a much stricter interval than a pass: ``rollback_confidence`` =
``1 - (1 - confidence) / 50`` (0.999 for 0.95), in the spirit of the
Haybittle–Peto boundary of group-sequential trials. A pass happens once per step
and uses ``confidence``.

Streamed answers give all three latencies; a non-streaming answer gives end-to-end
latency and a TPOT of end-to-end time per output token (the gateway cannot see its
first token), so a rollout with only unary traffic is judged too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmfleet.errors import ConfigError
from lmfleet.gateway.abstats import VersionSamples, quantile_ratio_interval, two_proportions

Action = Literal["hold", "advance", "complete", "rollback"]
Status = Literal["running", "completed", "rolled_back"]
Verdict = Literal["pass", "fail", "unclear"]

#: candidate weights of the default plan, in percent
DEFAULT_STEP_WEIGHTS = (5.0, 25.0, 50.0, 100.0)
#: the latency metrics judged, each against its ``max_<metric>_p90_ratio``
LATENCY_METRICS = ("ttft", "tpot", "e2e")


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
    max_e2e_p90_ratio: float = 1.5
    min_samples_for_judgement: int = 100
    confidence: float = 0.95

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
        if self.steps[0].weight >= 100.0:
            raise ConfigError(
                "steps[0].weight: the first step must stay below 100 so that the baseline "
                "takes traffic to judge the candidate against (e.g. 5, 25, 50, 100)"
            )
        if self.max_error_rate_increase < 0:
            raise ConfigError("max_error_rate_increase must be >= 0")
        if min(self.max_ttft_p90_ratio, self.max_tpot_p90_ratio, self.max_e2e_p90_ratio) <= 0:
            raise ConfigError("max_ttft_p90_ratio, max_tpot_p90_ratio and max_e2e_p90_ratio "
                              "must be > 0")  # fmt: skip
        if self.min_samples_for_judgement < 1:
            raise ConfigError("min_samples_for_judgement must be >= 1")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0.5, 1), got {self.confidence}")

    @classmethod
    def default(
        cls, candidate: str, baseline: str, min_requests: int = 200, min_duration_s: float = 300.0
    ) -> RolloutPlan:
        """5 % → 25 % → 50 % → 100 %, each for ``min_requests`` and ``min_duration_s``."""
        steps = tuple(RolloutStep(w, min_requests, min_duration_s) for w in DEFAULT_STEP_WEIGHTS)
        return cls(candidate, baseline, steps)

    def ratio_limit(self, metric: str) -> float:
        limit: float = getattr(self, f"max_{metric}_p90_ratio")
        return limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate, "baseline": self.baseline,
            "steps": [{"weight": s.weight, "min_requests": s.min_requests,
                       "min_duration_s": s.min_duration_s} for s in self.steps],
            "max_error_rate_increase": self.max_error_rate_increase,
            "max_ttft_p90_ratio": self.max_ttft_p90_ratio,
            "max_tpot_p90_ratio": self.max_tpot_p90_ratio,
            "max_e2e_p90_ratio": self.max_e2e_p90_ratio,
            "min_samples_for_judgement": self.min_samples_for_judgement,
            "confidence": self.confidence,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        steps = tuple(RolloutStep(**s) for s in data["steps"])
        return cls(**{**data, "steps": steps})


@dataclass(slots=True)
class StepWindow:
    """The samples one step is judged on: baseline and candidate over the same span
    of time (the caller records only split-assigned requests)."""

    baseline_name: str
    candidate_name: str
    started_at: float
    baseline: VersionSamples = field(default_factory=VersionSamples)
    candidate: VersionSamples = field(default_factory=VersionSamples)

    def samples_for(self, version: str) -> VersionSamples | None:
        if version == self.candidate_name:
            return self.candidate
        if version == self.baseline_name:
            return self.baseline
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "baseline_requests": self.baseline.total,
            "candidate_requests": self.candidate.total,
        }


@dataclass(frozen=True, slots=True)
class MetricJudgement:
    """One metric of one window: the figures and the verdict."""

    metric: str
    verdict: Verdict
    #: candidate / baseline p90 (latency) or candidate − baseline (error rate)
    value: float
    low: float
    high: float
    limit: float
    n_baseline: int
    n_candidate: int
    #: the low end of the (stricter) interval a rollback is judged on
    rollback_low: float

    def describe(self) -> str:
        if self.metric == "error_rate":
            text = (f"error rate {self.value:+.2%} vs baseline (interval {self.low:+.2%} .. "
                    f"{self.high:+.2%}, limit +{self.limit:.2%})")  # fmt: skip
            bound = f"{self.rollback_low:+.2%}"
        else:
            text = (f"{self.metric.upper()} p90 ratio {self.value:.3g} (interval "
                    f"{self.low:.3g} .. {self.high:.3g}, limit {self.limit:g}x)")  # fmt: skip
            bound = f"{self.rollback_low:.3g}"
        if self.verdict == "fail":
            text += f"; the rollback bound {bound} is above the limit"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "verdict": self.verdict, "value": self.value,
            "low": self.low, "high": self.high, "limit": self.limit,
            "n_baseline": self.n_baseline, "n_candidate": self.n_candidate,
            "rollback_low": self.rollback_low,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decision:
    """What the caller should do now, and why. ``at`` is the caller's time.
    ``pending`` names what a hold waits for (``requests``, ``duration``,
    ``samples`` or a metric): the caller logs a hold when that set changes, not when
    only the numbers in ``reason`` do."""

    action: Action
    step_index: int
    candidate_weight: float
    reason: str
    at: float = 0.0
    pending: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "step_index": self.step_index,
            "candidate_weight": self.candidate_weight,
            "reason": self.reason,
            "at": self.at,
            "pending": list(self.pending),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["action"], int(data["step_index"]), float(data["candidate_weight"]),
                   str(data["reason"]), float(data.get("at", 0.0)),
                   tuple(data.get("pending", ())))  # fmt: skip


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
    window: dict[str, Any]
    judgements: tuple[MetricJudgement, ...]
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
            "window": self.window,
            "judgements": [j.to_dict() for j in self.judgements],
            "last_decision": None if self.last_decision is None else self.last_decision.to_dict(),
            "history": [d.to_dict() for d in self.history],
        }


class Rollout:
    """One rollout. ``history`` keeps the transitions (advance, complete, rollback),
    not every hold; ``last_decision`` is the latest of any kind; ``window`` is the
    current step's samples (a new one each step)."""

    def __init__(self, plan: RolloutPlan, now: float) -> None:
        self.plan = plan
        self.started_at = now
        self.status: Status = "running"
        self.step_index = 0
        self.window = StepWindow(plan.baseline, plan.candidate, now)
        self.last_decision: Decision | None = None
        self.last_judgements: tuple[MetricJudgement, ...] = ()
        self.history: list[Decision] = []

    @classmethod
    def restore(
        cls, plan: RolloutPlan, now: float, *, started_at: float, status: Status,
        step_index: int, history: list[Decision],
    ) -> Rollout:  # fmt: skip
        """A rollout an earlier process ran (its state file). The samples were not
        kept: a running one goes on at its step with a fresh window."""
        if not 0 <= step_index < len(plan.steps):
            raise ConfigError(f"step_index {step_index} is not a step of the plan")
        r = cls(plan, now)
        r.started_at = started_at
        r.status = status
        r.step_index = step_index
        r.history = list(history)
        r.last_decision = history[-1] if history else None
        return r

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
            step_started_at=self.window.started_at,
            window=self.window.summary(),
            judgements=self.last_judgements,
            last_decision=self.last_decision,
            history=tuple(self.history),
        )

    def evaluate(self, now: float) -> Decision:
        """Judge the current window and the step's gates; see the module docstring.

        Once completed or rolled back it keeps returning that final decision.
        """
        if self.status != "running" and self.last_decision is not None:
            return self.last_decision
        gates, gate_reasons = [], []
        step = self.plan.steps[self.step_index]
        elapsed = now - self.window.started_at
        if elapsed < step.min_duration_s:
            gates.append("duration")
            gate_reasons.append(f"{elapsed:.0f}/{step.min_duration_s:.0f} s this step")
        seen = self.window.candidate.total
        if seen < step.min_requests:
            gates.append("requests")
            gate_reasons.append(f"{seen}/{step.min_requests} candidate requests this step")
        judgements, pending, reasons = judge(self.plan, self.window)
        self.last_judgements = judgements
        failed = [j for j in judgements if j.verdict == "fail"]
        if failed:
            return self._rollback(now, "; ".join(j.describe() for j in failed))
        pending, reasons = gates + pending, gate_reasons + reasons
        if pending:
            return self._decide("hold", now, "; ".join(reasons), tuple(pending))
        return self._next_step(now)

    def rollback(self, now: float, reason: str) -> Decision:
        """Roll back by hand (admin API). No effect once completed or rolled back."""
        if self.status != "running" and self.last_decision is not None:
            return self.last_decision
        return self._rollback(now, f"manual: {reason}")

    # -- internals -----------------------------------------------------------------

    def _next_step(self, now: float) -> Decision:
        last = len(self.plan.steps) - 1
        passed = f"step {self.step_index} passed: " + "; ".join(
            j.describe() for j in self.last_judgements
        )
        if self.step_index == last:
            self.status = "completed"
            return self._decide("complete", now, passed)
        self.step_index += 1
        old = self.window
        self.window = StepWindow(self.plan.baseline, self.plan.candidate, now)
        if self.plan.steps[self.step_index].weight >= 100.0:
            self.window.baseline = old.baseline  # no baseline traffic at 100 %
        return self._decide("advance", now, passed)

    def _rollback(self, now: float, reason: str) -> Decision:
        self.status = "rolled_back"
        return self._decide("rollback", now, reason)

    def _decide(
        self, action: Action, now: float, reason: str, pending: tuple[str, ...] = ()
    ) -> Decision:
        decision = Decision(action, self.step_index, self.candidate_weight, reason, now, pending)
        self.last_decision = decision
        if action != "hold":
            self.history.append(decision)
        return decision


def rollback_confidence(confidence: float) -> float:
    """The confidence of the interval a rollback is judged on (see the module doc)."""
    return 1.0 - (1.0 - confidence) / 50.0


def judge(
    plan: RolloutPlan, window: StepWindow
) -> tuple[tuple[MetricJudgement, ...], list[str], list[str]]:
    """The verdict on each metric that has enough samples in ``window``, what a hold
    waits for, and the reasons in words."""
    strict = rollback_confidence(plan.confidence)
    need = plan.min_samples_for_judgement
    base, cand = window.baseline, window.candidate
    have = min(base.total, cand.total)
    if have < need:
        return (), ["samples"], [f"{have}/{need} requests on each version before judging"]
    out = [_judge_errors(plan, base, cand, strict)]
    for metric in LATENCY_METRICS:
        a, b = base.values(metric), cand.values(metric)
        if len(a) < need or len(b) < need:
            continue
        ratio = quantile_ratio_interval(list(a), list(b), 0.9, plan.confidence)
        wide = quantile_ratio_interval(list(a), list(b), 0.9, strict)
        if ratio is None or wide is None:
            continue
        point, low, high = ratio
        limit = plan.ratio_limit(metric)
        verdict: Verdict = "fail" if wide[1] > limit else "pass" if high <= limit else "unclear"
        out.append(MetricJudgement(metric, verdict, point, low, high, limit, len(a), len(b),
                                   wide[1]))  # fmt: skip
    unclear = [j for j in out if j.verdict == "unclear"]
    pending = [j.metric for j in unclear]
    reasons = [f"inconclusive: {j.describe()}" for j in unclear]
    return tuple(out), pending, reasons


def _judge_errors(
    plan: RolloutPlan, base: VersionSamples, cand: VersionSamples, strict: float
) -> MetricJudgement:
    n = (base.errors, base.total, cand.errors, cand.total)
    cmp, wide = two_proportions(*n, plan.confidence), two_proportions(*n, strict)
    diff = cmp.diff if cmp.diff is not None else 0.0
    low = cmp.ci_low if cmp.ci_low is not None else diff
    high = cmp.ci_high if cmp.ci_high is not None else diff
    fail_low = wide.ci_low if wide.ci_low is not None else diff
    limit = plan.max_error_rate_increase
    verdict: Verdict = "pass" if diff <= limit else "fail" if fail_low > limit else "unclear"
    return MetricJudgement(
        "error_rate", verdict, diff, low, high, limit, base.total, cand.total, fail_low
    )
