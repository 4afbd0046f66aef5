"""Progressive rollout, the pure policy on a virtual clock: each step judged on its
own window, inconclusive evidence holds, and seeded simulations of whole rollouts
(an identical candidate completes, a 2x slower one is rolled back, every time)."""

from __future__ import annotations

import json
import math
import random

import pytest

from lmfleet.errors import ConfigError
from lmfleet.gateway.abstats import VersionSamples
from lmfleet.gateway.rollout import Decision, Rollout, RolloutPlan, RolloutStep, judge

STEPS = (RolloutStep(10, 100, 60.0), RolloutStep(50, 200, 120.0), RolloutStep(100, 100, 60.0))


def plan(**kw) -> RolloutPlan:
    base = {
        "candidate": "v2",
        "baseline": "v1",
        "steps": STEPS,
        "max_error_rate_increase": 0.02,
        "max_ttft_p90_ratio": 1.5,
        "max_tpot_p90_ratio": 1.3,
        "min_samples_for_judgement": 50,
    }
    return RolloutPlan(**(base | kw))


def feed(
    s: VersionSamples, n: int, *, ttft=0.2, tpot=0.02, e2e=1.0, errors=0, rng=None
) -> VersionSamples:
    """``n`` requests; with ``rng``, latencies spread ±10 % around the given ones."""
    for i in range(n):
        k = 1.0 if rng is None else rng.uniform(0.9, 1.1)
        s.record(ttft=ttft * k, tpot=tpot * k, e2e=e2e * k, error=i < errors)
    return s


def test_the_first_step_holds_until_requests_and_time_are_met():
    r = Rollout(plan(), now=0.0)
    assert r.candidate_weight == 10
    feed(r.window.baseline, 500)
    feed(r.window.candidate, 60)
    d = r.evaluate(30.0)
    assert (d.action, d.candidate_weight) == ("hold", 10)
    assert "60/100 candidate requests" in d.reason and "30/60 s" in d.reason
    assert d.pending == ("duration", "requests")

    feed(r.window.candidate, 40)
    d = r.evaluate(59.0)
    assert d.action == "hold" and d.pending == ("duration",)
    d = r.evaluate(60.0)
    assert (d.action, d.step_index, d.candidate_weight) == ("advance", 1, 50)
    assert r.candidate_weight == 50 and r.state.status == "running"
    assert r.last_decision is d and r.history == [d]


def test_each_step_is_judged_on_its_own_window():
    r = Rollout(plan(), now=0.0)
    feed(r.window.baseline, 500)
    feed(r.window.candidate, 100)
    first = r.window
    assert r.evaluate(60.0).action == "advance"
    assert r.window is not first and r.window.started_at == 60.0
    assert (r.window.baseline.total, r.window.candidate.total) == (0, 0)
    d = r.evaluate(500.0)
    assert d.action == "hold" and d.pending == ("requests", "samples")
    # a regression in the new step is not diluted by the good first step
    feed(r.window.baseline, 200)
    feed(r.window.candidate, 200, ttft=0.6)
    d = r.evaluate(501.0)
    assert d.action == "rollback" and "TTFT p90 ratio 3" in d.reason


def test_a_step_at_100_percent_is_judged_against_the_previous_baseline():
    p = plan(steps=(RolloutStep(50, 0, 0.0), RolloutStep(100, 100, 0.0)))
    r = Rollout(p, now=0.0)
    feed(r.window.baseline, 100)
    feed(r.window.candidate, 100)
    reference = r.window.baseline
    assert r.evaluate(1.0).action == "advance"
    assert r.window.baseline is reference and r.window.candidate.total == 0
    feed(r.window.candidate, 100)
    d = r.evaluate(2.0)
    assert (d.action, r.state.status, d.candidate_weight) == ("complete", "completed", 100)
    assert [h.action for h in r.history] == ["advance", "complete"]
    assert [h.at for h in r.history] == [1.0, 2.0]
    # finished: the same decision comes back, nothing more is recorded
    assert r.evaluate(999.0) is d and len(r.history) == 2


def test_it_never_advances_before_the_slos_can_be_judged():
    p = plan(steps=(RolloutStep(10, 5, 0.0), RolloutStep(100, 5, 0.0)))
    r = Rollout(p, now=0.0)
    feed(r.window.baseline, 1000)
    feed(r.window.candidate, 10)
    d = r.evaluate(10.0)
    assert d.action == "hold" and "10/50 requests on each version" in d.reason
    feed(r.window.candidate, 40)
    assert r.evaluate(11.0).action == "advance"


def test_error_rate_rise_rolls_back_only_when_clearly_over_the_limit():
    r = Rollout(plan(), now=0.0)
    feed(r.window.baseline, 1000, errors=10)  # 1 %
    feed(r.window.candidate, 100, errors=4)  # 4 %: +3 points, but 4 of 100
    d = r.evaluate(1.0)
    assert d.action == "hold" and "error_rate" in d.pending
    feed(r.window.candidate, 200, errors=20)  # 24 of 300 = 8 %
    d = r.evaluate(2.0)
    assert (d.action, d.candidate_weight, r.candidate_weight) == ("rollback", 0, 0)
    assert d.reason.startswith("error rate +7.00% vs baseline")
    assert r.state.status == "rolled_back" and r.evaluate(3.0) is d


def test_an_error_rate_within_the_limit_passes():
    r = Rollout(plan(steps=(RolloutStep(10, 0, 0.0), RolloutStep(100, 0, 0.0))), now=0.0)
    feed(r.window.baseline, 200, errors=2)
    feed(r.window.candidate, 100, errors=2)  # +1 point of an allowed 2
    assert r.evaluate(1.0).action == "advance"


@pytest.mark.parametrize(
    ("ttft", "tpot", "action", "reason"),
    [
        (0.2, 0.02, "advance", "step 0 passed"),
        (0.4, 0.02, "rollback", "TTFT p90 ratio 2"),
        (0.2, 0.04, "rollback", "TPOT p90 ratio 2"),
        (0.3, 0.02, "hold", "inconclusive: TTFT p90 ratio 1.5"),  # at the limit
    ],
)
def test_latency_ratios_with_their_intervals(ttft, tpot, action, reason):
    rng = random.Random(7)
    r = Rollout(plan(steps=(RolloutStep(10, 0, 0.0), RolloutStep(100, 0, 0.0))), now=0.0)
    feed(r.window.baseline, 200, rng=rng)
    feed(r.window.candidate, 200, ttft=ttft, tpot=tpot, rng=rng)
    d = r.evaluate(1.0)
    assert d.action == action, d.reason
    assert reason in d.reason


def test_latency_judged_on_the_p90_not_the_mean():
    r = Rollout(plan(), now=0.0)
    feed(r.window.baseline, 400, rng=random.Random(1))
    # 75 % twice as fast, 25 % three times slower: the mean barely moves (0.225 s
    # against 0.2 s), the p90 triples
    feed(feed(r.window.candidate, 300, ttft=0.1), 100, ttft=0.6)
    judgements, _, _ = judge(r.plan, r.window)
    ttft = next(j for j in judgements if j.metric == "ttft")
    assert ttft.verdict == "fail" and ttft.value == pytest.approx(3.0, rel=0.15)


def test_unary_only_traffic_is_judged_on_e2e():
    r = Rollout(plan(steps=(RolloutStep(10, 0, 0.0), RolloutStep(100, 0, 0.0))), now=0.0)
    rng = random.Random(3)
    for side, k in ((r.window.baseline, 1.0), (r.window.candidate, 3.0)):
        for _ in range(200):
            e2e = rng.uniform(0.9, 1.1) * k
            side.record(e2e=e2e, tpot=e2e / 100)  # no TTFT without a stream
    d = r.evaluate(1.0)
    assert d.action == "rollback" and "E2E p90 ratio" in d.reason
    e2e = next(j for j in r.last_judgements if j.metric == "e2e")
    assert e2e.verdict == "fail" and e2e.value == pytest.approx(3.0, rel=0.05)


def test_constant_samples_are_judged_without_dividing_by_zero():
    r = Rollout(plan(steps=(RolloutStep(10, 0, 0.0), RolloutStep(100, 0, 0.0))), now=0.0)
    feed(r.window.baseline, 100)
    feed(r.window.candidate, 100)
    assert r.evaluate(1.0).action == "advance"


def test_pending_names_stay_the_same_while_only_numbers_change():
    """The runner logs a hold when ``pending`` changes: not once a second."""
    r = Rollout(plan(), now=0.0)
    feed(r.window.baseline, 500)
    reasons, pendings = set(), set()
    for t in range(1, 40):
        feed(r.window.candidate, 1)
        d = r.evaluate(float(t))
        reasons.add(d.reason)
        pendings.add(d.pending)
    assert len(reasons) > 30 and pendings == {("duration", "requests", "samples")}


def test_manual_rollback_state_and_restore():
    r = Rollout(plan(), now=5.0)
    d = r.rollback(7.0, "operator saw bad outputs")
    assert (d.action, d.candidate_weight, d.reason) == (
        "rollback",
        0,
        "manual: operator saw bad outputs",
    )
    state = r.state.to_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["status"] == "rolled_back" and state["history"][0]["at"] == 7.0
    assert r.rollback(8.0, "again") is d
    p = RolloutPlan.from_dict(json.loads(json.dumps(r.plan.to_dict())))
    assert p == r.plan
    history = [Decision.from_dict(h) for h in state["history"]]
    back = Rollout.restore(p, 100.0, started_at=5.0, status="rolled_back", step_index=0,
                           history=history)  # fmt: skip
    assert back.candidate_weight == 0 and back.evaluate(101.0) == history[-1]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"candidate": "v1"}, "both 'v1'"),
        ({"steps": ()}, "no steps"),
        ({"steps": (RolloutStep(50, 1, 0), RolloutStep(20, 1, 0))}, r"steps\[1\]\.weight"),
        ({"steps": (RolloutStep(0, 1, 0),)}, r"steps\[0\]\.weight"),
        ({"steps": (RolloutStep(150, 1, 0),)}, r"steps\[0\]\.weight"),
        ({"steps": (RolloutStep(100, 1, 0),)}, "first step must stay below 100"),
        ({"steps": (RolloutStep(10, -1, 0),)}, "min_requests"),
        ({"max_ttft_p90_ratio": 0}, "ratio"),
        ({"max_e2e_p90_ratio": -1}, "ratio"),
        ({"max_error_rate_increase": -0.1}, "max_error_rate_increase"),
        ({"min_samples_for_judgement": 0}, "min_samples_for_judgement"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_invalid_plans_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        plan(**kw)


def test_default_plan():
    p = RolloutPlan.default("v2", "v1")
    assert [s.weight for s in p.steps] == [5, 25, 50, 100]


# ---- whole rollouts in virtual time -----------------------------------------------------


def simulate(seed: int, slowdown: float, *, rps: int = 20, limit_s: int = 4 * 3600) -> Rollout:
    """A default-shaped rollout (5/25/50/100 %) under ``rps`` requests a virtual
    second, log-normal latencies, the candidate ``slowdown`` times slower; evaluated
    every virtual second, as the runner does. Returns the rollout at its end."""
    rng = random.Random(seed)
    steps = tuple(RolloutStep(w, 100, 60.0) for w in (5.0, 25.0, 50.0, 100.0))
    r = Rollout(RolloutPlan("v2", "v1", steps, min_samples_for_judgement=100), now=0.0)
    t = 0
    while r.status == "running" and t < limit_s:
        t += 1
        for _ in range(rps):
            candidate = rng.random() * 100.0 < r.candidate_weight
            side = r.window.candidate if candidate else r.window.baseline
            k = slowdown if candidate else 1.0
            ttft = rng.lognormvariate(math.log(0.2), 0.5) * k
            tpot = rng.lognormvariate(math.log(0.02), 0.3) * k
            side.record(ttft=ttft, tpot=tpot, e2e=ttft + 99 * tpot, error=rng.random() < 0.01)
        r.evaluate(float(t))
    return r


def test_an_identical_candidate_completes_in_every_seeded_run():
    ends = [simulate(seed, 1.0) for seed in range(20)]
    assert [r.status for r in ends] == ["completed"] * 20
    assert all([h.action for h in r.history] == ["advance"] * 3 + ["complete"] for r in ends)


def test_a_candidate_twice_as_slow_is_rolled_back_in_every_seeded_run():
    ends = [simulate(seed, 2.0) for seed in range(20)]
    assert [r.status for r in ends] == ["rolled_back"] * 20
    # caught at the first step, at 5 % of the traffic
    assert all(r.history[-1].step_index == 0 for r in ends)
