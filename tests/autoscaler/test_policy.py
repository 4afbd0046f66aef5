"""The autoscaler policy on scripted observations, and its invariants under hypothesis.

``FakeFleet`` applies each decision the way a provider would (start → STARTING, READY
after the cold start; wake → WAKING, READY after the wake; sleep → ASLEEP; drain →
gone) in virtual time, so scenarios read like the issue's: a burst, a long load, an
idle fleet, oscillating load.
"""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmfleet.autoscaler import (
    AutoscalingConfig,
    Decision,
    InvalidObservation,
    PolicyState,
    ReplicaPhase,
    ReplicaView,
    StartMark,
    VersionObservation,
    decide,
)
from lmfleet.errors import ConfigError

READY, STARTING, WAKING = ReplicaPhase.READY, ReplicaPhase.STARTING, ReplicaPhase.WAKING
ASLEEP, DRAINING, DEAD = ReplicaPhase.ASLEEP, ReplicaPhase.DRAINING, ReplicaPhase.DEAD


def view(id: str, state: ReplicaPhase = READY, in_flight: int = 0, **kw) -> ReplicaView:
    return ReplicaView(id, state, in_flight=in_flight, **kw)


def observe(now: float, *replicas: ReplicaView, queue: int = 0, **kw) -> VersionObservation:
    return VersionObservation(
        now=now, version="chat/v1", queue_depth=queue, replicas=replicas, **kw
    )


def settle(cfg: AutoscalingConfig, *replicas: ReplicaView, until: float = 100.0) -> PolicyState:
    """The state after watching ``replicas`` (and deciding) every interval to ``until``."""
    state = PolicyState()
    t = 0.0
    while t <= until:
        state = decide(observe(t, *replicas), cfg, state).state
        t += cfg.interval_s
    return state


def watched(desired: int, now: float = 100.0) -> PolicyState:
    """A state at ``desired`` that has watched long enough and whose stabilization
    window holds nothing higher: the next decision may scale down."""
    return PolicyState(version="chat/v1", first_seen=0.0, last_seen=now, desired=desired)


@dataclass
class _Replica:
    state: ReplicaPhase
    since: float
    ready_at: float | None = None


class FakeFleet:
    """A provider in virtual time: applies decisions, turns STARTING/WAKING READY."""

    def __init__(
        self,
        cfg: AutoscalingConfig,
        *,
        ready: int = 0,
        asleep: int = 0,
        time_to_ready: float = 60.0,
        wake: float = 2.0,
    ) -> None:
        self.cfg, self.time_to_ready, self.wake = cfg, time_to_ready, wake
        self.replicas: dict[str, _Replica] = {}
        self.state = PolicyState()
        self.decisions: list[Decision] = []
        self.cold_starts = 0
        self._n = 0
        for _ in range(ready):
            self._add(READY, 0.0)
        for _ in range(asleep):
            self._add(ASLEEP, 0.0)

    def _add(self, state: ReplicaPhase, now: float, ready_at: float | None = None) -> str:
        self._n += 1
        rid = f"r{self._n:03d}"
        self.replicas[rid] = _Replica(state, now, ready_at)
        return rid

    def count(self, state: ReplicaPhase) -> int:
        return sum(r.state is state for r in self.replicas.values())

    def observation(self, now: float, load: int, **kw) -> VersionObservation:
        for r in self.replicas.values():
            if r.ready_at is not None and r.ready_at <= now:
                r.state, r.since, r.ready_at = READY, r.ready_at, None
        ready = sorted(rid for rid, r in self.replicas.items() if r.state is READY)
        share = dict.fromkeys(ready, 0)
        cap = 2 * int(self.cfg.target_per_replica)
        left = load
        for i in range(load):
            if not ready or share[ready[i % len(ready)]] >= cap:
                break
            share[ready[i % len(ready)]] += 1
            left -= 1
        views = tuple(
            ReplicaView(rid, r.state, in_flight=share.get(rid, 0), since=r.since)
            for rid, r in self.replicas.items()
        )
        kw.setdefault("time_to_ready_s", self.time_to_ready)
        kw.setdefault("wake_s", self.wake)
        return VersionObservation(now, "chat/v1", queue_depth=left, replicas=views, **kw)

    def tick(self, now: float, load: int, **kw) -> Decision:
        d = decide(self.observation(now, load, **kw), self.cfg, self.state)
        self.state = d.state
        self.decisions.append(d)
        for rid in d.wake:
            r = self.replicas[rid]
            r.state, r.since, r.ready_at = WAKING, now, now + self.wake
        for _ in range(d.start):
            self._add(STARTING, now, now + self.time_to_ready)
            self.cold_starts += 1
        for rid in d.sleep:
            r = self.replicas[rid]
            r.state, r.since = ASLEEP, now
        for rid in d.drain:
            del self.replicas[rid]
        return d

    def run(self, start: float, end: float, load, **kw) -> None:
        """Tick every interval from ``start`` (inclusive) to ``end`` (exclusive);
        ``load`` is a number or a function of time."""
        t = start
        while t < end - 1e-9:
            self.tick(t, load(t) if callable(load) else load, **kw)
            t += self.cfg.interval_s


def reversals(decisions: list[Decision]) -> list[float]:
    """Times at which ``desired`` changed direction."""
    out, last = [], 0
    for a, b in itertools.pairwise(decisions):
        step = (b.desired > a.desired) - (b.desired < a.desired)
        if step and last and step != last:
            out.append(b.state.last_seen)
        last = step or last
    return out


# -- config and observation checks ---------------------------------------------------


def test_the_policy_imports_nothing_heavy():
    # a fresh interpreter: the simulator and the KEDA scaler import it without torch
    code = (
        "import sys, lmfleet.autoscaler\n"
        "heavy = ('torch', 'numpy', 'fastapi', 'httpx', 'lmfleet.engine', 'lmfleet.server',"
        " 'lmfleet.gateway')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "raise max_replicas or lower min_replicas"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas must be ≥ 1"),
        ({"standby": 5, "max_replicas": 4}, "count toward max_replicas"),
        ({"min_replicas": -1}, "min_replicas must be an integer ≥ 0"),
        ({"min_replicas": True}, "min_replicas must be an integer"),
        ({"target_per_replica": 0}, "target_per_replica must be a number > 0"),
        ({"panic_threshold": 1.0}, "panic_threshold must be > 1"),
        ({"stabilization_window_s": -1}, "stabilization_window_s must be a number ≥ 0"),
        ({"interval_s": math.nan}, "interval_s must be a number > 0"),
        ({"ahead_max_factor": 0.5}, "ahead_max_factor must be ≥ 1"),
        ({"max_reversals": 0}, "max_reversals must be ≥ 1"),
        ({"slo_ttft_p90_s": 0}, "slo_ttft_p90_s must be a number > 0"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AutoscalingConfig(**kwargs)


def test_config_defaults_are_valid():
    cfg = AutoscalingConfig()
    assert (cfg.min_replicas, cfg.max_replicas, cfg.standby) == (1, 4, 0)
    assert cfg.target_per_replica == 16


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: view("a", in_flight=1, waiting=2), "waiting .* is part of in_flight"),
        (lambda: view("a", in_flight=-1), "in_flight must be an integer ≥ 0"),
        (lambda: ReplicaView("a", "sleeping"), "'sleeping' is not one of"),  # type: ignore[arg-type]
        (lambda: ReplicaView("", READY), "non-empty string"),
        (lambda: observe(0, view("a"), view("a")), "appears twice"),
        (lambda: observe(0, queue=-1), "queue_depth must be an integer ≥ 0"),
        (lambda: observe(math.inf), "finite number of seconds"),
        (lambda: observe(0, arrival_rate=-1.0), "arrival_rate must be a number ≥ 0"),
    ],
)
def test_observation_rejects_inconsistent_input(build, message):
    with pytest.raises(InvalidObservation, match=message):
        build()


def test_state_strings_are_accepted():
    assert ReplicaView("a", "asleep").state is ASLEEP  # type: ignore[arg-type]


def test_state_belongs_to_one_version_and_time_moves_forward():
    cfg = AutoscalingConfig()
    state = decide(observe(10.0, view("a")), cfg).state
    with pytest.raises(InvalidObservation, match="keep one PolicyState per version"):
        decide(VersionObservation(11.0, "chat/v2", replicas=(view("a"),)), cfg, state)
    with pytest.raises(InvalidObservation, match="monotonic clock"):
        decide(observe(9.0, view("a")), cfg, state)


# -- scale up --------------------------------------------------------------------------


def test_a_burst_scales_up_in_one_call_sized_to_the_backlog():
    cfg = AutoscalingConfig(max_replicas=10)
    state = settle(cfg, view("a"))
    # 90 queued in the gateway + 6 waiting inside the replica + 4 running = 100 → 7 replicas
    d = decide(observe(102.0, view("a", in_flight=10, waiting=6), queue=90), cfg, state)
    assert d.desired == 7
    assert d.start == 6 and d.wake == () and d.drain == () and d.sleep == ()
    assert d.inputs["load"] == 100 and d.inputs["waiting"] == 96
    assert d.inputs["panic"] is True
    assert d.reason.startswith("up 1→7")


def test_scale_up_is_bounded_by_max_replicas():
    cfg = AutoscalingConfig(max_replicas=3)
    d = decide(observe(102.0, view("a"), queue=1000), cfg, settle(cfg, view("a")))
    assert d.desired == 3 and d.start == 2


def test_scale_from_zero_on_the_first_queued_request():
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4)
    state = decide(observe(0.0), cfg).state
    assert state.desired == 0
    d = decide(observe(2.0, queue=1), cfg, state)
    assert (d.desired, d.start) == (1, 1)


def test_scale_from_zero_wakes_a_sleeper_and_refills_the_pool():
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4, standby=1)
    sleeper = view("s", ASLEEP)
    state = settle(cfg, sleeper)
    d = decide(observe(200.0, sleeper, queue=1), cfg, state)
    assert d.desired == 1 and d.wake == ("s",)
    assert d.start == 1 and d.inputs["start_cold"] == 0 and d.inputs["start_for_standby"] == 1


def test_standby_is_woken_before_any_cold_start():
    cfg = AutoscalingConfig(max_replicas=6, standby=2)
    fleet = (view("a"), view("s1", ASLEEP, since=5.0), view("s2", ASLEEP, since=1.0))
    state = settle(cfg, *fleet)
    d = decide(observe(102.0, *fleet, queue=64), cfg, state)
    # 64 → 4 replicas: wake both sleepers (the longest asleep first), one cold start,
    # and two more cold starts refill the pool (4 serving + 2 asleep = 6 = max)
    assert d.desired == 4
    assert d.wake == ("s2", "s1")
    assert (d.inputs["start_cold"], d.inputs["start_for_standby"], d.start) == (1, 2, 3)
    assert d.standby == 2


def test_a_sleeper_serves_before_a_refill_that_is_still_starting():
    """The pool's refill is a cold start; when load needs one more replica while it
    starts, the sleeper is woken (seconds) and the starting replica takes its place
    in the pool, instead of the load waiting out the cold start."""
    cfg = AutoscalingConfig(max_replicas=6, standby=1, target_per_replica=8)
    fleet = (view("a", in_flight=8), view("b", in_flight=8), view("s", ASLEEP, since=1.0),
             view("c", STARTING, since=90.0))  # fmt: skip
    state = settle(cfg, view("a"), view("b"), view("s", ASLEEP, since=1.0))
    d = decide(observe(102.0, *fleet, queue=8), cfg, state)
    assert d.desired == 3
    assert d.wake == ("s",) and d.start == 0 and d.drain == ()
    assert d.standby == 1  # c, once READY, is the pool


def test_the_pool_shrinks_before_max_replicas_is_passed():
    cfg = AutoscalingConfig(max_replicas=4, standby=2)
    fleet = (view("a"), view("s1", ASLEEP), view("s2", ASLEEP))
    d = decide(observe(102.0, *fleet, queue=100), cfg, settle(cfg, *fleet))
    assert d.desired == 4 and d.standby == 0
    assert d.wake == ("s1", "s2") and d.start == 1


def test_refill_replicas_go_to_sleep_once_ready():
    cfg = AutoscalingConfig(max_replicas=5, standby=1)
    fleet = FakeFleet(cfg, ready=1, asleep=1, time_to_ready=30.0)
    fleet.run(0, 100, 4)
    fleet.run(100, 102, 40)  # 40 → 3: wake the sleeper, start one cold, one for the pool
    assert (fleet.count(WAKING), fleet.count(STARTING)) == (1, 2)
    fleet.run(102, 140, 40)
    # both cold starts are READY: one serves, the other refilled the pool
    assert (fleet.count(READY), fleet.count(ASLEEP), fleet.count(STARTING)) == (3, 1, 0)
    assert fleet.cold_starts == 2


def test_scale_ahead_by_time_to_ready_while_load_and_arrivals_grow():
    cfg = AutoscalingConfig(max_replicas=20)
    rising = [
        observe(
            t,
            view("a", in_flight=min(32, 5 * t)),
            queue=max(0, 5 * t - 32),
            arrival_rate=0.5 * t,
            time_to_ready_s=60.0,
        )
        for t in range(0, 12, 2)
    ]
    state = PolicyState()
    for o in rising:
        d = decide(o, cfg, state)
        state = d.state
    # load 50, growing 5/s; 60 s to ready → projected 350, capped at 2× → 100 → 7
    assert d.inputs["base_recommendation"] == 4
    assert d.inputs["load_slope_per_s"] == pytest.approx(5.0)
    assert d.desired == 7
    flat = replace(cfg, scale_ahead=False)
    state = PolicyState()
    for o in rising:
        d = decide(o, flat, state)
        state = d.state
    assert d.desired == 4


def test_no_scale_ahead_when_the_backlog_grows_but_arrivals_do_not():
    cfg = AutoscalingConfig(max_replicas=20)
    state = PolicyState()
    for t in range(0, 12, 2):
        d = decide(observe(t, view("a", in_flight=16), queue=5 * t, arrival_rate=3.0), cfg, state)
        state = d.state
    assert d.inputs["ahead_load"] == d.inputs["load"] == 66
    assert d.desired == 5


def test_draining_and_dead_replicas_count_for_nothing():
    cfg = AutoscalingConfig(max_replicas=3)
    replicas = (
        view("a", in_flight=10),
        view("old1", DRAINING, in_flight=40),
        view("old2", DRAINING, in_flight=40),
        view("gone", DEAD),
    )
    d = decide(observe(102.0, *replicas, queue=30), cfg, settle(cfg, view("a")))
    # load 40 (the draining replicas finish theirs), and max 3 leaves room for 2 more
    assert d.inputs["load"] == 40 and (d.inputs["draining"], d.inputs["dead"]) == (2, 1)
    assert d.desired == 3 and d.start == 2


# -- capacity to come ------------------------------------------------------------------


def test_a_multi_minute_load_causes_no_cascade_of_starts():
    cfg = AutoscalingConfig(max_replicas=30)
    fleet = FakeFleet(cfg, ready=1, time_to_ready=180.0)
    fleet.run(0, 100, 8, arrival_rate=2.0)
    d = fleet.tick(100, 64, arrival_rate=2.0)
    assert d.start == 3
    # the queue keeps growing while they load (2 requests/s, steady): no extra start
    fleet.run(102, 280, lambda t: 64 + int(2 * (t - 100)), arrival_rate=2.0)
    assert fleet.cold_starts == 3
    held = [d for d in fleet.decisions[-80:] if d.inputs["held"]]
    # first below 2× what is coming; past it, arrivals have not grown
    assert "capacity to come" in held[0].reason
    assert "arrivals are 1.00× the rate at the last start" in held[-1].reason
    # once READY, the backlog that built up is served: a second, sized wave
    d = fleet.tick(280, 64 + 2 * 180, arrival_rate=2.0)
    assert d.start == 424 // 16 + 1 - 4


def test_starting_replicas_hold_without_an_arrival_rate_until_the_load_outgrows_them():
    cfg = AutoscalingConfig(max_replicas=30)
    fleet = FakeFleet(cfg, ready=1, time_to_ready=180.0)
    fleet.run(0, 100, 8)
    assert fleet.tick(100, 64).start == 3  # capacity to come: 4 replicas, 64 requests
    fleet.run(102, 130, lambda t: 64 + int(2 * (t - 100)))  # to 120 < 2 × 64
    assert fleet.cold_starts == 3
    d = fleet.tick(130, 140)  # over 2× what is coming: a burst on top of the burst
    assert d.desired == 9 and d.start == 5


def test_arrivals_that_grow_while_replicas_start_get_proportional_capacity():
    cfg = AutoscalingConfig(max_replicas=30)
    fleet = FakeFleet(cfg, ready=1, time_to_ready=180.0)
    fleet.run(0, 100, 8, arrival_rate=2.0)
    assert fleet.tick(100, 64, arrival_rate=2.0).start == 3
    # arrivals ×1.5 and the load past 2× the 4 coming: 6 (not the 25 the queue asks)
    d = fleet.tick(102, 400, arrival_rate=3.0)
    assert d.desired == 6 and d.start == 2
    assert "arrivals are 1.50× the rate at the last start" in d.reason


def test_a_dead_replica_is_replaced_even_while_others_start():
    cfg = AutoscalingConfig(max_replicas=10)
    starting = view("c", STARTING)
    state = settle(cfg, view("a", in_flight=20), view("b", in_flight=20), starting)
    assert state.desired == 3
    d = decide(observe(102.0, view("a", in_flight=20), view("b", DEAD), starting), cfg, state)
    assert d.desired == 3 and d.start == 1


# -- scale down ------------------------------------------------------------------------


def test_scale_down_waits_for_the_window_then_steps_one_at_a_time_to_min():
    cfg = AutoscalingConfig(min_replicas=2, max_replicas=8)
    fleet = FakeFleet(cfg, ready=6)
    fleet.run(0, 100, 90)  # 90 → 6 replicas
    assert fleet.decisions[-1].desired == 6
    fleet.run(100, 158, 0)
    assert fleet.decisions[-1].desired == 6  # t=98 had load: still inside the 60 s window
    fleet.run(158, 160, 0)
    assert fleet.decisions[-1].desired == 5 and len(fleet.decisions[-1].drain) == 1
    fleet.run(160, 200, 0)
    desired = [d.desired for d in fleet.decisions[-20:]]
    assert min(desired) == 2
    assert all(a - b <= 1 for a, b in itertools.pairwise(desired))


def test_scale_down_waits_a_full_window_after_the_policy_starts():
    cfg = AutoscalingConfig(max_replicas=8)
    fleet = (view("a"), view("b"), view("c"))
    state = PolicyState()
    for t in range(0, 60, 2):
        d = decide(observe(t, *fleet), cfg, state)
        state = d.state
        assert d.desired == 3 and not d.drain
    assert "watched less than" in d.reason
    assert decide(observe(60, *fleet), cfg, state).desired == 2


def test_victims_are_the_least_busy():
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=8)
    busy = (
        view("a", in_flight=3, remaining_tokens=900),
        view("b", in_flight=0, since=10.0),
        view("c", in_flight=1, remaining_tokens=5000),
        view("d", in_flight=1, remaining_tokens=20),
        view("e", in_flight=0, since=50.0),
    )
    state = watched(5)
    order = []
    replicas = list(busy)
    t = 102.0
    while len(replicas) > 1:
        d = decide(observe(t, *replicas), cfg, state)
        state = d.state
        order += d.drain
        replicas = [r for r in replicas if r.id not in d.drain]
        t += 2
    # idle first (the newest of them first), then fewest requests, then fewest tokens
    assert order == ["e", "b", "d", "c"]


def test_scale_down_sleeps_instead_of_stopping_while_the_pool_is_short():
    cfg = AutoscalingConfig(max_replicas=6, standby=1)
    replicas = (view("a"), view("b", in_flight=2), view("c", in_flight=9))
    d = decide(observe(102.0, *replicas), cfg, watched(3))
    # 3 → 2 at this step: the idle one goes to sleep (pool 0 of 1), nothing stops
    assert d.desired == 2 and d.sleep == ("a",) and d.drain == () and d.start == 0
    asleep = (view("a", ASLEEP), view("b", in_flight=2), view("c", in_flight=9))
    d = decide(observe(104.0, *asleep), cfg, d.state)
    assert d.desired == 1 and d.drain == ("b",) and d.sleep == ()


def test_starting_replicas_beyond_desired_are_cancelled_when_the_pool_is_full():
    cfg = AutoscalingConfig(max_replicas=6, standby=1)
    replicas = (view("a", in_flight=4), view("s", ASLEEP), view("n", STARTING, since=90.0))
    d = decide(observe(102.0, *replicas), cfg, watched(2))
    assert d.desired == 1 and d.drain == ("n",) and d.start == 0


def test_idle_timeout_scales_to_zero():
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4, idle_timeout_s=300.0)
    fleet = FakeFleet(cfg, ready=3)
    fleet.run(0, 50, 40)
    fleet.run(50, 348, 0)
    assert fleet.decisions[-1].desired == 1  # the last replica stays until the timeout
    fleet.run(348, 352, 0)
    assert fleet.decisions[-1].desired == 0 and fleet.count(READY) == 0
    assert "no load for 300 s" in fleet.decisions[-1].reason
    fleet.run(352, 400, 0)
    assert fleet.cold_starts == 0 and fleet.decisions[-1].desired == 0
    assert fleet.tick(400, 1).start == 1  # and back on the first request


def test_scale_to_zero_keeps_the_pool():
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4, standby=1, idle_timeout_s=100.0)
    fleet = FakeFleet(cfg, ready=1, asleep=1)
    fleet.run(0, 110, 0)
    assert (fleet.count(READY), fleet.count(ASLEEP), fleet.cold_starts) == (0, 1, 0)
    d = fleet.tick(200, 3)
    assert d.wake and d.start == 1  # wake it, refill the pool in the background


def test_the_last_replica_goes_to_sleep_when_max_left_no_room_for_the_pool():
    # max 1: while one serves the pool is 0; at zero the pool is 1, so the last
    # replica sleeps instead of stopping
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=1, standby=1, idle_timeout_s=100.0)
    fleet = FakeFleet(cfg, ready=1)
    fleet.run(0, 98, 0)
    assert fleet.count(READY) == 1 and fleet.decisions[-1].standby == 0
    fleet.run(98, 110, 0)
    assert (fleet.count(READY), fleet.count(ASLEEP), fleet.cold_starts) == (0, 1, 0)
    d = fleet.tick(200, 1)
    assert d.wake and d.start == 0


def test_no_scale_down_while_panicking():
    cfg = AutoscalingConfig(max_replicas=8, stabilization_window_s=10.0, panic_window_s=60.0)
    fleet = FakeFleet(cfg, ready=1, time_to_ready=4.0)
    fleet.run(0, 20, 4)
    fleet.tick(20, 100)
    fleet.run(22, 78, 0)
    assert fleet.decisions[-1].desired == 7
    assert "panic" in fleet.decisions[-1].reason
    fleet.run(78, 84, 0)
    assert fleet.decisions[-1].desired < 7


def test_slo_guard_adds_one_replica_and_waits_for_it():
    cfg = AutoscalingConfig(max_replicas=8, slo_ttft_p90_s=2.0, slo_cooldown_s=30.0)
    fleet = FakeFleet(cfg, ready=2, time_to_ready=10.0)
    fleet.run(0, 100, 20, ttft_p90_s=1.0)
    assert fleet.decisions[-1].desired == 2
    d = fleet.tick(100, 20, ttft_p90_s=3.5)
    assert d.desired == 3 and "SLO" in d.reason
    fleet.run(102, 130, 20, ttft_p90_s=3.5)
    assert fleet.decisions[-1].desired == 3  # cooldown: the window must see the new one
    fleet.run(130, 132, 20, ttft_p90_s=3.5)
    assert fleet.decisions[-1].desired == 4


# -- oscillation -----------------------------------------------------------------------


def _square(high: int, period: float):
    return lambda t: high if (t % period) < period / 2 else 0


def test_oscillating_load_gives_a_bounded_number_of_reversals():
    cfg = AutoscalingConfig(max_replicas=8, stabilization_window_s=20.0, panic_window_s=0.0)
    bounded = FakeFleet(cfg, ready=1, time_to_ready=5.0)
    bounded.run(0, 3600, _square(96, 120.0))
    free = FakeFleet(replace(cfg, max_reversals=10_000), ready=1, time_to_ready=5.0)
    free.run(0, 3600, _square(96, 120.0))
    unbounded, kept = reversals(free.decisions), reversals(bounded.decisions)
    assert len(unbounded) > 50  # about two a period without the bound
    assert len(kept) <= (cfg.max_reversals + 1) * math.ceil(3600 / cfg.reversal_window_s)
    for t in kept:
        in_window = [u for u in kept if t - cfg.reversal_window_s < u <= t]
        assert len(in_window) <= cfg.max_reversals + 1


# -- properties ------------------------------------------------------------------------


@st.composite
def configs(draw) -> AutoscalingConfig:
    lo = draw(st.integers(0, 4))
    hi = draw(st.integers(max(lo, 1), 10))
    return AutoscalingConfig(
        min_replicas=lo,
        max_replicas=hi,
        standby=draw(st.integers(0, min(hi, 3))),
        target_per_replica=draw(st.sampled_from([1.0, 4.0, 8.0, 16.0, 2.5])),
        stabilization_window_s=draw(st.sampled_from([0.0, 10.0, 60.0])),
        panic_window_s=draw(st.sampled_from([0.0, 6.0, 60.0])),
        idle_timeout_s=draw(st.sampled_from([0.0, 30.0, 300.0])),
        max_reversals=draw(st.integers(1, 4)),
        scale_ahead=draw(st.booleans()),
        slo_ttft_p90_s=draw(st.sampled_from([None, 1.0])),
    )


@st.composite
def replica_sets(draw, limit: int) -> tuple[ReplicaView, ...]:
    n = draw(st.integers(0, limit))
    out = []
    for i in range(n):
        state = draw(st.sampled_from(list(ReplicaPhase)))
        in_flight = draw(st.integers(0, 40)) if state in (READY, DRAINING) else 0
        out.append(
            ReplicaView(
                f"r{i}",
                state,
                in_flight=in_flight,
                waiting=draw(st.integers(0, in_flight)),
                remaining_tokens=draw(st.integers(0, 3)) * 1000 if in_flight else 0,
                since=draw(st.none() | st.integers(0, 100).map(float)),
            )
        )
    return tuple(out)


@st.composite
def situations(draw):
    """A config, a fleet within max_replicas, a state built from a random history,
    and the observation to decide."""
    cfg = draw(configs())
    replicas = draw(replica_sets(cfg.max_replicas + 3))
    kept = [r for r in replicas if r.state not in (DRAINING, DEAD)]
    assume(len(kept) <= cfg.max_replicas)
    state, t = PolicyState(), 0.0
    for dt, queue in draw(
        st.lists(st.tuples(st.sampled_from([1.0, 2.0, 30.0]), st.integers(0, 200)), max_size=8)
    ):
        d = decide(observe(t, *replicas, queue=queue, arrival_rate=queue / 10), cfg, state)
        state, t = d.state, t + dt
    queue = draw(st.integers(0, 200))
    ttft = draw(st.none() | st.sampled_from([0.5, 3.0]))
    obs = observe(t, *replicas, queue=queue, arrival_rate=queue / 10, ttft_p90_s=ttft)
    return cfg, state, obs


_PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(situations())
def test_desired_stays_within_min_and_max(situation):
    cfg, state, obs = situation
    d = decide(obs, cfg, state)
    assert cfg.min_replicas <= d.desired <= cfg.max_replicas
    assert 0 <= d.standby <= min(cfg.standby, cfg.max_replicas - d.desired)


@_PROPERTY
@given(situations())
def test_actions_name_the_right_replicas_and_respect_max(situation):
    cfg, state, obs = situation
    d = decide(obs, cfg, state)
    by_id = {r.id: r for r in obs.replicas}
    assert all(by_id[i].state is ASLEEP for i in d.wake)
    assert all(by_id[i].state is READY for i in d.sleep)
    assert all(by_id[i].state in (READY, STARTING, ASLEEP) for i in d.drain)
    touched = [*d.wake, *d.sleep, *d.drain]
    assert len(touched) == len(set(touched))
    states = Counter(r.state for r in obs.replicas)
    kept = sum(states[s] for s in (READY, WAKING, STARTING, ASLEEP))
    assert kept + d.start - len(d.drain) <= cfg.max_replicas
    assert d.start == d.inputs["start_cold"] + d.inputs["start_for_standby"]
    if d.sleep:  # only while the pool is short
        assert states[ASLEEP] + len(d.sleep) <= cfg.standby


@_PROPERTY
@given(situations())
def test_never_a_victim_with_more_work_than_a_non_victim(situation):
    cfg, state, obs = situation
    d = decide(obs, cfg, state)
    ready = [r for r in obs.replicas if r.state is READY]
    victims = [r for r in ready if r.id in d.sleep or r.id in d.drain]
    spared = [r for r in ready if r not in victims]
    for v in victims:
        assert all(v.work <= s.work for s in spared)


@st.composite
def enough_coming(draw):
    """A fleet whose READY, WAKING and STARTING replicas cover the load."""
    cfg = replace(draw(configs()), slo_ttft_p90_s=None)
    n = draw(st.integers(max(cfg.min_replicas, 1), cfg.max_replicas))
    kinds = draw(st.lists(st.sampled_from([READY, WAKING, STARTING]), min_size=n, max_size=n))
    capacity = int(n * cfg.target_per_replica)
    replicas, load = [], 0
    for i, kind in enumerate(kinds):
        work = draw(st.integers(0, capacity - load)) if kind is READY else 0
        load += work
        replicas.append(view(f"r{i}", kind, in_flight=work))
    replicas += [view(f"s{i}", ASLEEP) for i in range(draw(st.integers(0, cfg.max_replicas - n)))]
    replicas += [view(f"d{i}", DRAINING, in_flight=5) for i in range(draw(st.integers(0, 2)))]
    return cfg, replicas, draw(st.integers(0, capacity - load))


@_PROPERTY
@given(enough_coming())
def test_no_start_while_enough_capacity_is_coming(case):
    cfg, replicas, queue = case
    d = decide(observe(0.0, *replicas, queue=queue), cfg, PolicyState())
    assert d.inputs["start_cold"] == 0
    # a sleeper may be woken only to serve in place of a replica still starting
    # (which then joins the pool): never on top of READY + WAKING + STARTING
    starting = sum(r.state is STARTING for r in replicas)
    assert len(d.wake) <= starting


def test_no_start_while_the_last_scale_up_loads_and_arrivals_hold():
    cfg = AutoscalingConfig(max_replicas=20)
    state = replace(watched(4), start_mark=StartMark(90.0, 4, 5.0))
    rnd = random.Random(0)
    for t in range(102, 300, 2):
        replicas = (view("a", in_flight=16), *(view(f"s{i}", STARTING) for i in range(3)))
        queue = rnd.randrange(0, 2 * 16 * 4)  # below the panic factor of what is coming
        d = decide(observe(t, *replicas, queue=queue, arrival_rate=5.0), cfg, state)
        state = d.state
        assert d.start == 0


@_PROPERTY
@given(situations(), st.randoms(use_true_random=False))
def test_decisions_are_deterministic_and_ignore_replica_order(situation, rnd: random.Random):
    cfg, state, obs = situation
    first = decide(obs, cfg, state)
    assert decide(obs, cfg, state) == first
    shuffled = list(obs.replicas)
    rnd.shuffle(shuffled)
    assert decide(replace(obs, replicas=tuple(shuffled)), cfg, state) == first


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 120), min_size=20, max_size=200),
    st.integers(1, 3),
)
def test_reversals_stay_bounded_under_any_load(loads, max_reversals):
    cfg = AutoscalingConfig(
        max_replicas=8,
        stabilization_window_s=4.0,
        panic_window_s=0.0,
        max_reversals=max_reversals,
        reversal_window_s=100.0,
    )
    fleet = FakeFleet(cfg, ready=1, time_to_ready=4.0, wake=1.0)
    for i, load in enumerate(loads):
        fleet.tick(2.0 * i, load)
    times = reversals(fleet.decisions)
    for t in times:
        assert len([u for u in times if t - cfg.reversal_window_s < u <= t]) <= max_reversals + 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(0, 3))
def test_a_burst_is_met_in_one_decision(burst, asleep):
    cfg = AutoscalingConfig(max_replicas=10, standby=min(asleep, 3))
    fleet = FakeFleet(cfg, ready=1, asleep=asleep)
    fleet.run(0, 100, 0)
    d = fleet.tick(100, burst)
    want = min(cfg.max_replicas, max(1, math.ceil(burst / cfg.target_per_replica)))
    assert d.desired == want
    assert len(d.wake) == min(asleep, want - 1)
    assert d.inputs["start_cold"] == want - 1 - len(d.wake)
