"""The KEDA + HPA baseline on scripted observations: the metric's lag between polls,
the HPA's tolerance, rate limit and scale-down window, KEDA's 0 ↔ 1, the
ReplicaSet's victims, the bounds.

``Pods`` applies each decision as a Deployment would (start → a STARTING pod that is
READY ``time_to_ready`` later, drain → gone) in virtual time; the waiting requests
are scripted as a function of time and put in the gateway's queue."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

import pytest

from lmfleet.autoscaler import (
    Decision,
    InvalidObservation,
    KedaConfig,
    KedaState,
    ReplicaPhase,
    ReplicaView,
    VersionObservation,
    keda_hpa,
)
from lmfleet.errors import ConfigError

READY, STARTING, ASLEEP = ReplicaPhase.READY, ReplicaPhase.STARTING, ReplicaPhase.ASLEEP


def observe(now: float, *replicas: ReplicaView, queue: int = 0) -> VersionObservation:
    return VersionObservation(now=now, version="chat/v1", queue_depth=queue, replicas=replicas)


class Pods:
    """A Deployment in virtual time: applies the decisions, pods become READY after
    ``time_to_ready``; ``waiting(t)`` is the metric the trigger would read."""

    def __init__(self, cfg: KedaConfig, *, ready: int = 1, time_to_ready: float = 60.0) -> None:
        self.cfg, self.time_to_ready = cfg, time_to_ready
        self.pods: dict[str, tuple[ReplicaPhase, float]] = {}
        self.state = KedaState()
        self.decisions: list[Decision] = []
        self._n = 0
        for _ in range(ready):
            self._add(READY, -1000.0)

    def _add(self, state: ReplicaPhase, since: float) -> None:
        self._n += 1
        self.pods[f"p{self._n:02d}"] = (state, since)

    def tick(self, now: float, waiting: int) -> Decision:
        for pid, (state, since) in list(self.pods.items()):
            if state is STARTING and now >= since + self.time_to_ready:
                self.pods[pid] = (READY, since + self.time_to_ready)
        views = tuple(ReplicaView(pid, s, since=t) for pid, (s, t) in self.pods.items())
        d = keda_hpa(observe(now, *views, queue=waiting), self.cfg, self.state)
        self.state = d.state
        self.decisions.append(d)
        for _ in range(d.start):
            self._add(STARTING, now)
        for pid in d.drain:
            del self.pods[pid]
        assert not d.wake and not d.sleep and d.standby == 0  # KEDA never sleeps or wakes
        return d

    def run(self, start: float, end: float, waiting: Callable[[float], int] | int, step=1.0):
        t = start
        while t < end - 1e-9:
            self.tick(t, waiting(t) if callable(waiting) else waiting)
            t += step

    def desired_at(self, t: float) -> int:
        return next(d.desired for d in self.decisions if d.state.last_seen == t)


# -- the knobs -------------------------------------------------------------------------


def test_the_defaults_are_the_documented_ones():
    cfg = KedaConfig()
    assert (cfg.threshold, cfg.activation_threshold) == (5.0, 0.0)  # production-stack, KEDA
    assert (cfg.polling_interval_s, cfg.cooldown_period_s) == (15.0, 300.0)
    assert (cfg.sync_period_s, cfg.tolerance) == (15.0, 0.1)  # kube-controller-manager
    assert (cfg.scale_up_percent, cfg.scale_up_pods, cfg.scale_up_period_s) == (100.0, 4, 15.0)
    assert (cfg.scale_up_stabilization_s, cfg.scale_down_stabilization_s) == (0.0, 300.0)
    assert (cfg.scale_down_percent, cfg.scale_down_period_s) == (100.0, 15.0)
    assert cfg.standby == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "raise max_replicas or lower min_replicas"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas must be ≥ 1"),
        ({"threshold": 0}, "keda.threshold must be a number > 0"),
        ({"polling_interval_s": math.inf}, "keda.polling_interval_s must be a number > 0"),
        ({"tolerance": 1.0}, r"keda.tolerance must be in \[0, 1\)"),
        ({"scale_down_stabilization_s": -1}, "must be a number ≥ 0"),
        ({"scale_down_percent": 150}, "scale_down_percent must be ≤ 100"),
        ({"scale_up_pods": 1.5}, "scale_up_pods must be an integer"),
    ],
)
def test_bad_knobs_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KedaConfig(**kwargs)


# -- the metric's lag ------------------------------------------------------------------


def test_a_burst_between_two_polls_is_unseen_until_the_next():
    fleet = Pods(KedaConfig(max_replicas=10))
    fleet.run(0, 15, lambda t: 0 if t < 3 else 30)  # the burst comes 3 s after a poll
    assert {d.desired for d in fleet.decisions} == {1}
    assert fleet.decisions[-1].inputs["metric"] == 0 and fleet.decisions[-1].inputs["waiting"] == 30
    d = fleet.tick(15, 30)  # the next poll, and the HPA's sync with it
    assert d.inputs["sampled"] and d.inputs["synced"] and d.inputs["metric"] == 30
    assert (d.desired, d.start) == (5, 4)  # ceil(30 / 5) = 6, at most +4 in one step


def test_the_hpa_reads_the_last_sample_between_polls():
    # KEDA's default 30 s poll: the sync at 15 s still sees the sample of 0 s
    fleet = Pods(KedaConfig(max_replicas=10, polling_interval_s=30))
    fleet.run(0, 30, lambda t: 0 if t < 1 else 30)
    at_15 = fleet.decisions[15]
    assert at_15.inputs["synced"] and not at_15.inputs["sampled"]
    assert at_15.inputs["metric"] == 0 and at_15.desired == 1
    assert fleet.tick(30, 30).desired == 5


def test_a_late_loop_keeps_the_grid_and_skips_what_it_missed():
    fleet = Pods(KedaConfig())
    fleet.tick(0, 0)
    fleet.tick(37, 0)  # polls were due at 15 and 30: one sample now, the next at 45
    assert fleet.state.next_poll == 45 and fleet.state.next_sync == 45


# -- the HPA ---------------------------------------------------------------------------


def test_no_change_within_the_tolerance():
    cfg = KedaConfig(max_replicas=10)
    within = Pods(cfg, ready=3)
    within.run(0, 1, 16)  # 16 / (5 × 3) = 1.07: within 10 %, although ceil(16 / 5) = 4
    assert within.decisions[0].desired == 3 and within.decisions[0].inputs["within_tolerance"]
    beyond = Pods(cfg, ready=3)
    beyond.run(0, 1, 17)  # 1.13: beyond
    assert beyond.decisions[0].desired == 4


def test_scale_up_is_limited_to_double_or_four_more_per_period():
    fleet = Pods(KedaConfig(max_replicas=30), time_to_ready=1000)
    fleet.run(0, 46, 100, step=15.0)  # 100 waiting: ceil(100 / 5) = 20 wanted at once
    assert [d.desired for d in fleet.decisions] == [5, 10, 20, 20]  # +4, +100 %, +100 %


def test_the_scale_up_limit_counts_from_the_start_of_its_period():
    # syncs every 5 s, policies per 15 s: 1 → 5 at 0; at 5 and 10 the period still
    # began at 1 replica, so no more; at 15 it begins at 5: up to 10
    fleet = Pods(KedaConfig(max_replicas=30, sync_period_s=5, polling_interval_s=5))
    fleet.run(0, 16, 100, step=5.0)
    assert [d.desired for d in fleet.decisions] == [5, 5, 5, 10]


def test_scale_down_waits_for_the_highest_proposal_of_the_last_300_s():
    fleet = Pods(KedaConfig(max_replicas=10), ready=4)
    fleet.run(0, 301, lambda t: 20 if t < 1 else 0)  # 4 wanted at 0 s, then nothing waits
    assert fleet.desired_at(285) == 4  # the proposal of 4 at 0 s is still in the window
    down = fleet.decisions[300]
    assert down.desired == 1 and len(down.drain) == 3  # 100 % per 15 s: at once to min


def test_a_short_peak_inside_the_window_holds_the_count_up():
    fleet = Pods(KedaConfig(max_replicas=10), ready=2, time_to_ready=0)
    fleet.run(0, 451, lambda t: 30 if 150 <= t < 160 else 0)
    # the sample at 150 s asked for 6: held until 300 s after it, not after the start
    assert fleet.desired_at(300) == 6 and fleet.desired_at(435) == 6
    assert fleet.desired_at(450) == 1


def test_a_growing_queue_keeps_scaling_up_while_the_pods_load():
    # no load-time awareness: pods still loading count as pods, the queue grows
    fleet = Pods(KedaConfig(max_replicas=12), time_to_ready=600)
    fleet.run(0, 61, lambda t: 20 + int(t), step=15.0)
    assert [d.desired for d in fleet.decisions] == [4, 7, 10, 12, 12]


# -- KEDA: 0 ↔ 1 -----------------------------------------------------------------------


def test_the_last_replica_goes_after_the_cooldown_and_a_waiting_request_brings_it_back():
    fleet = Pods(KedaConfig(min_replicas=0), ready=1, time_to_ready=30)
    fleet.run(0, 300, 0)
    assert fleet.desired_at(285) == 1  # the cooldown counts from the first sample
    d = fleet.tick(300, 0)
    assert d.desired == 0 and d.drain == ("p01",)
    fleet.run(301, 310, 0)
    fleet.run(310, 315, 3)  # requests wait in the gateway's queue: unseen until the poll
    assert {d.desired for d in fleet.decisions[-5:]} == {0}
    up = fleet.tick(315, 3)
    assert (up.desired, up.start) == (1, 1) and "activation" in up.reason


def test_a_waiting_request_restarts_the_cooldown():
    fleet = Pods(KedaConfig(min_replicas=0))
    fleet.run(0, 601, lambda t: 1 if 100 <= t < 106 else 0)
    assert fleet.decisions[105].inputs["last_active"] == 105  # sampled at the 105 s poll
    assert fleet.desired_at(390) == 1 and fleet.desired_at(405) == 0


def test_activation_threshold_and_min_replicas_above_zero():
    quiet = Pods(KedaConfig(min_replicas=0, activation_threshold=2), ready=0)
    quiet.run(0, 31, 2)  # 2 waiting is not above 2: stays at zero
    assert {d.desired for d in quiet.decisions} == {0}
    assert not any(d.inputs["synced"] for d in quiet.decisions)  # the HPA is off at zero
    kept = Pods(KedaConfig(min_replicas=1))
    kept.run(0, 1000, 0, step=15.0)
    assert {d.desired for d in kept.decisions} == {1}


# -- the ReplicaSet --------------------------------------------------------------------


def test_victims_are_not_ready_first_then_the_most_recently_ready_whatever_their_work():
    cfg = KedaConfig(min_replicas=2, max_replicas=10, scale_down_stabilization_s=0)
    replicas = (
        ReplicaView("old", READY, in_flight=0, since=10.0),
        ReplicaView("newest", READY, in_flight=9, waiting=0, since=50.0),
        ReplicaView("middle", READY, in_flight=0, since=30.0),
        ReplicaView("loading", STARTING, since=60.0),
    )
    d = keda_hpa(observe(100.0, *replicas), cfg, KedaState(desired=4))
    assert d.desired == 2 and d.drain == ("loading", "newest")  # the busiest goes too
    shuffled = list(replicas)
    random.Random(7).shuffle(shuffled)
    again = keda_hpa(observe(100.0, *shuffled), cfg, KedaState(desired=4))
    assert again.drain == d.drain and again.reason == d.reason


def test_a_missing_pod_is_replaced_between_syncs_and_a_sleeper_stopped():
    cfg = KedaConfig(max_replicas=5)
    state = KedaState(version="chat/v1", last_seen=10, desired=3, next_poll=15, next_sync=15,
                      metric=0, metric_at=0)  # fmt: skip
    obs = observe(12.0, ReplicaView("a", READY), ReplicaView("b", ASLEEP))
    d = keda_hpa(obs, cfg, state)
    assert not d.inputs["synced"] and d.desired == 3
    assert d.start == 2 and d.drain == ("b",)


# -- bounds and contract ---------------------------------------------------------------


def test_min_and_max_bound_every_decision():
    capped = Pods(KedaConfig(max_replicas=3))
    capped.run(0, 100, 1000)
    assert max(d.desired for d in capped.decisions) == 3 and len(capped.pods) == 3
    floor = Pods(KedaConfig(min_replicas=2, max_replicas=4), ready=0)
    first = floor.tick(0, 0)
    assert (first.desired, first.start) == (2, 2)
    floor.run(1, 700, 0)
    assert {d.desired for d in floor.decisions} == {2}


def test_the_first_decision_takes_the_replicas_it_finds():
    d = keda_hpa(observe(0.0, *(ReplicaView(f"r{i}", READY) for i in range(3))), KedaConfig())
    assert d.desired == 3 and d.start == 0 and not d.drain  # 0 waiting, but a 300 s window


def test_observations_out_of_order_are_refused():
    d = keda_hpa(observe(10.0), KedaConfig())
    with pytest.raises(InvalidObservation, match="monotonic"):
        keda_hpa(observe(5.0), KedaConfig(), d.state)
    other = dataclasses.replace(observe(20.0), version="chat/v2")
    with pytest.raises(InvalidObservation, match="one KedaState per version"):
        keda_hpa(other, KedaConfig(), d.state)
