"""Progressive rollout: hold, advance, complete and roll back, on a fake clock."""

from __future__ import annotations

import json

import pytest

from lmfleet.errors import ConfigError
from lmfleet.gateway.abstats import VersionSamples
from lmfleet.gateway.rollout import Rollout, RolloutPlan, RolloutStep, slo_breach

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


def feed(s: VersionSamples, n: int, *, ttft=0.2, tpot=0.02, errors=0) -> VersionSamples:
    for i in range(n):
        s.record(ttft=ttft, tpot=tpot, e2e=1.0, error=i < errors)
    return s


def test_the_first_step_holds_until_requests_and_time_are_met():
    base, cand = feed(VersionSamples(), 1000), VersionSamples()
    r = Rollout(plan(), now=0.0)
    assert r.candidate_weight == 10

    feed(cand, 60)
    d = r.evaluate(30.0, base, cand)
    assert (d.action, d.candidate_weight) == ("hold", 10)
    assert "60/100 candidate requests" in d.reason and "30/60 s" in d.reason

    feed(cand, 40)
    d = r.evaluate(59.0, base, cand)
    assert d.action == "hold" and "candidate requests" not in d.reason  # only time is short
    d = r.evaluate(60.0, base, cand)
    assert (d.action, d.step_index, d.candidate_weight) == ("advance", 1, 50)

    # the candidate took the first step; the baseline's weight is the caller's business
    assert r.candidate_weight == 50 and r.state.status == "running"
    assert r.last_decision is d and r.history == [d]


def test_step_gates_count_from_the_step_start():
    base, cand = feed(VersionSamples(), 1000), feed(VersionSamples(), 100)
    r = Rollout(plan(), now=0.0)
    assert r.evaluate(60.0, base, cand).action == "advance"
    assert r.state.step_start_requests == 100 and r.state.step_started_at == 60.0
    feed(cand, 199)
    assert r.evaluate(1000.0, base, cand).action == "hold"  # 199 of 200 this step
    feed(cand, 1)
    assert r.evaluate(179.0, base, cand).action == "hold"  # 119 s of 120
    d = r.evaluate(180.0, base, cand)
    assert (d.action, d.step_index, d.candidate_weight) == ("advance", 2, 100)
    feed(cand, 100)
    d = r.evaluate(240.0, base, cand)
    assert (d.action, d.step_index, d.candidate_weight) == ("complete", 2, 100)
    assert r.state.status == "completed"
    assert [h.action for h in r.history] == ["advance", "advance", "complete"]
    assert [h.at for h in r.history] == [60.0, 180.0, 240.0]
    # finished: the same decision comes back, nothing more is recorded
    assert r.evaluate(999.0, base, feed(cand, 100, errors=100)) is d
    assert len(r.history) == 3


def test_candidate_requests_before_the_rollout_do_not_count():
    base, cand = feed(VersionSamples(), 1000), feed(VersionSamples(), 500)
    r = Rollout(plan(), now=0.0, candidate_requests=cand.total)
    assert r.evaluate(100.0, base, cand).action == "hold"
    feed(cand, 100)
    assert r.evaluate(100.0, base, cand).action == "advance"


def test_it_never_advances_before_the_slos_can_be_judged():
    p = plan(steps=(RolloutStep(10, 5, 0.0), RolloutStep(100, 5, 0.0)))
    base, cand = feed(VersionSamples(), 1000), feed(VersionSamples(), 10)
    r = Rollout(p, now=0.0)
    d = r.evaluate(10.0, base, cand)
    assert d.action == "hold" and "10/50 requests on each version" in d.reason
    feed(cand, 40)
    assert r.evaluate(11.0, base, cand).action == "advance"


def test_error_rate_increase_rolls_back():
    base = feed(VersionSamples(), 1000, errors=10)  # 1 %
    cand = feed(VersionSamples(), 100, errors=3)  # 3 %: +2 points, at the limit
    r = Rollout(plan(), now=0.0)
    assert r.evaluate(1.0, base, cand).action == "hold"
    feed(cand, 10, errors=1)  # 4/110 = 3.6 %
    d = r.evaluate(2.0, base, cand)
    assert (d.action, d.candidate_weight, r.candidate_weight) == ("rollback", 0, 0)
    assert "error rate 3.64% vs baseline 1.00%" in d.reason
    assert r.state.status == "rolled_back"
    assert r.evaluate(3.0, base, feed(VersionSamples(), 1000)) is d


def test_errors_are_not_judged_on_too_few_samples():
    base = feed(VersionSamples(), 1000)
    cand = feed(VersionSamples(), 49, errors=49)  # all failed, but only 49 < 50 samples
    r = Rollout(plan(), now=0.0)
    assert r.evaluate(1.0, base, cand).action == "hold"
    cand.record(error=True)
    assert r.evaluate(2.0, base, cand).action == "rollback"


@pytest.mark.parametrize(
    ("ttft", "tpot", "action", "reason"),
    [
        (0.29, 0.02, "hold", ""),  # 1.45x baseline TTFT: under 1.5x
        (0.31, 0.02, "rollback", "TTFT p90 0.31 s vs baseline 0.2 s: above 1.5x"),
        (0.2, 0.027, "rollback", "TPOT p90 0.027 s vs baseline 0.02 s: above 1.3x"),
    ],
)
def test_latency_p90_ratios_roll_back(ttft, tpot, action, reason):
    base = feed(VersionSamples(), 500)
    cand = feed(VersionSamples(), 60, ttft=ttft, tpot=tpot)
    d = Rollout(plan(), now=0.0).evaluate(5.0, base, cand)
    assert d.action == action
    assert reason in d.reason


def test_latency_judged_on_the_p90_not_the_mean():
    base = feed(VersionSamples(), 100)
    # 85 % fast, 15 % slow: the mean barely moves, the p90 triples
    cand = feed(feed(VersionSamples(), 85, ttft=0.1), 15, ttft=0.6)
    assert "TTFT p90" in slo_breach(plan(), base, cand)


def test_manual_rollback_and_state_for_the_admin_api():
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


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"candidate": "v1"}, "both 'v1'"),
        ({"steps": ()}, "no steps"),
        ({"steps": (RolloutStep(50, 1, 0), RolloutStep(20, 1, 0))}, r"steps\[1\]\.weight"),
        ({"steps": (RolloutStep(0, 1, 0),)}, r"steps\[0\]\.weight"),
        ({"steps": (RolloutStep(150, 1, 0),)}, r"steps\[0\]\.weight"),
        ({"steps": (RolloutStep(10, -1, 0),)}, "min_requests"),
        ({"max_ttft_p90_ratio": 0}, "ratio"),
        ({"max_error_rate_increase": -0.1}, "max_error_rate_increase"),
        ({"min_samples_for_judgement": 0}, "min_samples_for_judgement"),
    ],
)
def test_invalid_plans_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        plan(**kw)


def test_default_plan():
    p = RolloutPlan.default("v2", "v1")
    assert [s.weight for s in p.steps] == [5, 25, 50, 100]
