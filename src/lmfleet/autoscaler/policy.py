"""The autoscaler policy for one version: ``decide(observation, config, state)``.

Pure: no I/O, no clock, no randomness, nothing from the engine, server or gateway.
The live controller, the simulator and the KEDA external scaler all call this same
function; the caller keeps the returned :class:`PolicyState` and passes it back with
the next observation. Same inputs, same :class:`Decision`.

One decision, in order (docs/autoscaler.md explains each rule and knob):

1. **load** = the gateway's queue + every request the serving replicas hold (their
   own queue and what they run). Draining, dead and sleeping replicas carry none.
2. **recommendation** = ceil(load / target_per_replica), projected ahead by the
   time a new replica would take to serve when the backlog and the arrival rate
   are both growing.
3. **desired**: up at once to the recommendation; down only after the
   stabilization window (the highest recommendation of the window), one replica at
   a time, never in panic, never while the SLO is missed, and at most
   ``max_reversals`` changes of direction per ``reversal_window_s``. With
   ``min_replicas = 0`` the last replica goes after ``idle_timeout_s`` of no load.
4. **capacity to come**: while the cold replicas of the last scale-up still load,
   no more are started unless the load outgrew them by the panic factor and (when
   known) the arrival rate grew since.
5. **reconcile** the replicas to ``desired`` serving plus ``standby`` asleep: wake
   sleepers before counting replicas still starting (those join the pool instead)
   and before cold starts, then start cold ones to refill the pool; above
   ``desired``, cancel starting replicas, then put the least-busy READY ones to sleep
   while the pool is short and drain the rest.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from lmfleet.autoscaler.observation import (
    AutoscalingConfig,
    Decision,
    InvalidObservation,
    PolicyState,
    ReplicaPhase,
    ReplicaView,
    Sample,
    ScaleEvent,
    StartMark,
    VersionObservation,
)

#: tolerance for float rounding when a load divides evenly into replicas
_EPS = 1e-9


def decide(
    observation: VersionObservation,
    config: AutoscalingConfig,
    state: PolicyState | None = None,
) -> Decision:
    """Decide one version's replicas. Raises :class:`InvalidObservation` when the
    observation does not follow ``state`` (another version, time going backwards)."""
    obs, cfg = observation, config
    state = state if state is not None else PolicyState()
    _check_continuity(obs, state)
    fleet = _Fleet.of(obs)
    inputs = fleet.inputs()
    sig = _signals(obs, cfg, state, fleet, inputs)
    desired, why = _target(sig, cfg)
    desired, held = _hold(desired, sig.prev, fleet, sig.mark, obs, cfg)
    desired = _clamp(desired, cfg)
    plan = _reconcile(fleet, desired, cfg)
    inputs.update(held=held is not None, start_cold=plan.cold, start_for_standby=plan.refill)
    return Decision(
        desired=desired,
        standby=plan.pool,
        start=plan.cold + plan.refill,
        wake=plan.wake,
        sleep=plan.sleep,
        drain=plan.drain,
        reason=_reason(sig.prev, desired, held or why, plan),
        inputs=MappingProxyType(inputs),
        state=_next_state(obs, cfg, state, sig, desired, plan),
    )


# -- the steps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signals:
    """What this decision reads off the observation and the state."""

    prev: int
    first_seen: float
    load: int
    #: the load projected ahead (== load when not growing)
    ahead: float
    rec: int
    stable: int
    floor: int
    mark: StartMark | None
    panic_until: float | None
    idle_since: float | None
    slo_step: bool
    blocked: str | None


def _signals(
    obs: VersionObservation,
    cfg: AutoscalingConfig,
    state: PolicyState,
    fleet: _Fleet,
    inputs: dict[str, float | int | bool | str | None],
) -> _Signals:
    now, load = obs.now, fleet.load
    first_seen = state.first_seen if state.first_seen is not None else now
    prev = state.desired if state.desired is not None else _clamp(fleet.coming, cfg)
    mark = _live_mark(state.start_mark, fleet)
    rec, ahead = _recommend(obs, cfg, state, fleet, loading=mark is not None, inputs=inputs)
    panic_now = load > 0 and load >= cfg.panic_threshold * cfg.target_per_replica * fleet.coming
    panic_until = now + cfg.panic_window_s if panic_now else state.panic_until
    panicking = panic_now or (panic_until is not None and now < panic_until)
    # SLO guard: one more replica when a p90 is over target, nothing is on the way
    # and the last scale-up is old enough for the gateway's window to have seen it
    breached = _slo_breached(obs, cfg)
    slo_step = (
        breached
        and load > 0
        and rec <= fleet.coming
        and not (fleet.starting or fleet.waking)
        and (state.last_up_at is None or now - state.last_up_at >= cfg.slo_cooldown_s)
    )
    rec = fleet.coming + 1 if slo_step else rec
    idle_since = (state.idle_since if state.idle_since is not None else now) if load == 0 else None
    idle_long = idle_since is not None and now - idle_since >= cfg.idle_timeout_s
    reversals = sum(e.reversal for e in state.events if e.t > now - cfg.reversal_window_s)
    blocked = _down_blocked(
        young=now - first_seen < cfg.stabilization_window_s,
        panicking=panicking,
        breached=breached,
        oscillating=state.last_direction > 0 and reversals >= cfg.max_reversals,
        reversals=reversals,
        cfg=cfg,
    )
    window = _within(state.samples, now, cfg.stabilization_window_s)
    stable = max([s.recommendation for s in window] + [rec])
    floor = cfg.min_replicas if (cfg.min_replicas > 0 or idle_long) else 1
    inputs.update(
        recommendation=rec,
        stable_recommendation=stable,
        floor=floor,
        previous_desired=prev,
        panic=panicking,
        panic_until=panic_until,
        slo_breached=breached,
        idle_for_s=None if idle_since is None else now - idle_since,
        reversals_in_window=reversals,
        scale_down_blocked=blocked,
    )
    return _Signals(
        prev=prev,
        first_seen=first_seen,
        load=load,
        ahead=ahead,
        rec=rec,
        stable=stable,
        floor=floor,
        mark=mark,
        panic_until=panic_until,
        idle_since=idle_since,
        slo_step=slo_step,
        blocked=blocked,
    )


def _next_state(
    obs: VersionObservation,
    cfg: AutoscalingConfig,
    state: PolicyState,
    sig: _Signals,
    desired: int,
    plan: _Plan,
) -> PolicyState:
    now = obs.now
    direction = (desired > sig.prev) - (desired < sig.prev)
    events = tuple(e for e in state.events if e.t > now - cfg.reversal_window_s)
    if direction:
        reversal = state.last_direction != 0 and direction != state.last_direction
        events += (ScaleEvent(now, direction, reversal),)
    horizon = max(cfg.stabilization_window_s, cfg.trend_window_s)
    sample = Sample(now, sig.load, obs.arrival_rate, sig.rec)
    return PolicyState(
        version=obs.version,
        first_seen=sig.first_seen,
        last_seen=now,
        desired=desired,
        samples=(*_within(state.samples, now, horizon), sample),
        events=events,
        last_direction=direction or state.last_direction,
        idle_since=sig.idle_since,
        panic_until=sig.panic_until,
        last_up_at=now if direction > 0 else state.last_up_at,
        start_mark=StartMark(now, desired, obs.arrival_rate) if plan.cold else sig.mark,
    )


@dataclass(frozen=True, slots=True)
class _Fleet:
    """The observation's replicas grouped by what they count as, each group sorted."""

    queue_depth: int
    ready: tuple[ReplicaView, ...]
    waking: tuple[ReplicaView, ...]
    starting: tuple[ReplicaView, ...]
    asleep: tuple[ReplicaView, ...]
    draining: int
    dead: int

    @classmethod
    def of(cls, obs: VersionObservation) -> _Fleet:
        by_state: dict[ReplicaPhase, list[ReplicaView]] = {p: [] for p in ReplicaPhase}
        for r in sorted(obs.replicas, key=lambda r: r.id):
            by_state[r.state].append(r)
        return cls(
            queue_depth=obs.queue_depth,
            ready=tuple(sorted(by_state[ReplicaPhase.READY], key=_victim_order)),
            waking=tuple(by_state[ReplicaPhase.WAKING]),
            starting=tuple(sorted(by_state[ReplicaPhase.STARTING], key=_newest_first)),
            asleep=tuple(sorted(by_state[ReplicaPhase.ASLEEP], key=_oldest_first)),
            draining=len(by_state[ReplicaPhase.DRAINING]),
            dead=len(by_state[ReplicaPhase.DEAD]),
        )

    @property
    def serving(self) -> tuple[ReplicaView, ...]:
        return self.ready + self.waking + self.starting

    @property
    def coming(self) -> int:
        """Serving now or on the way: READY, WAKING and STARTING."""
        return len(self.ready) + len(self.waking) + len(self.starting)

    @property
    def load(self) -> int:
        return self.queue_depth + sum(r.in_flight for r in self.serving)

    def inputs(self) -> dict[str, float | int | bool | str | None]:
        return {
            "load": self.load,
            "queue_depth": self.queue_depth,
            "waiting": self.queue_depth + sum(r.waiting for r in self.serving),
            "in_flight": sum(r.in_flight for r in self.serving),
            "ready": len(self.ready),
            "waking": len(self.waking),
            "starting": len(self.starting),
            "asleep": len(self.asleep),
            "draining": self.draining,
            "dead": self.dead,
        }


def _recommend(
    obs: VersionObservation,
    cfg: AutoscalingConfig,
    state: PolicyState,
    fleet: _Fleet,
    *,
    loading: bool,
    inputs: dict[str, float | int | bool | str | None],
) -> tuple[int, float]:
    """ceil(load / target) and the load it used, projected ahead while the backlog and arrivals grow.
    Not while the last scale-up's replicas load: the backlog that builds up in front
    of them is what they were started for (``_hold`` decides on more)."""
    now, load = obs.now, fleet.load
    base = _ceil(load / cfg.target_per_replica)
    recent = _within(state.samples, now, cfg.trend_window_s)
    load_slope = _trend([(s.t, s.load) for s in recent] + [(now, load)])
    rate_points = [(s.t, s.arrival_rate) for s in recent if s.arrival_rate is not None]
    rate_slope = (
        _trend([*rate_points, (now, obs.arrival_rate)]) if obs.arrival_rate is not None else None
    )
    # the next replica is a wake while a sleeper would be left over, else a cold start
    if len(fleet.asleep) > max(0, base - fleet.coming):
        lead = obs.wake_s if obs.wake_s is not None else cfg.default_wake_s
    else:
        lead = (
            obs.time_to_ready_s if obs.time_to_ready_s is not None else cfg.default_time_to_ready_s
        )
    ahead = float(load)
    growing = load_slope is not None and load_slope > 0 and (rate_slope is None or rate_slope > 0)
    if cfg.scale_ahead and load > 0 and growing and not loading:
        ahead = min(load + load_slope * lead, load * cfg.ahead_max_factor)
    inputs.update(
        target_per_replica=cfg.target_per_replica,
        base_recommendation=base,
        load_slope_per_s=load_slope,
        arrival_rate=obs.arrival_rate,
        arrival_rate_slope=rate_slope,
        lead_s=lead,
        ahead_load=ahead,
        output_tokens_per_s=obs.output_tokens_per_s,
        ttft_p90_s=obs.ttft_p90_s,
        tpot_p90_s=obs.tpot_p90_s,
        time_to_ready_s=obs.time_to_ready_s,
        wake_s=obs.wake_s,
    )
    return _ceil(ahead / cfg.target_per_replica), ahead


def _down_blocked(
    *,
    young: bool,
    panicking: bool,
    breached: bool,
    oscillating: bool,
    reversals: int,
    cfg: AutoscalingConfig,
) -> str | None:
    """Why a scale-down may not happen now, or None."""
    if young:
        return f"the policy has watched less than the {cfg.stabilization_window_s:g} s window"
    if panicking:
        return "panic"
    if breached:
        return "the SLO is missed"
    if oscillating:
        return f"{reversals} reversals in the last {cfg.reversal_window_s:g} s (oscillation bound)"
    return None


def _target(sig: _Signals, cfg: AutoscalingConfig) -> tuple[int, str]:
    """Up at once; down one step to the window's peak recommendation, if allowed."""
    rec, prev = sig.rec, sig.prev
    if rec > prev:
        if sig.slo_step:
            return min(rec, cfg.max_replicas), "a p90 is over its SLO: one more replica"
        load = f"load {sig.load}" + (
            f" (growing: {sig.ahead:.0f} projected)" if sig.ahead > sig.load else ""
        )
        return min(rec, cfg.max_replicas), (
            f"{load} needs {rec} at {cfg.target_per_replica:g} per replica"
        )
    goal = max(sig.stable, sig.floor)
    if goal >= prev:
        return prev, "steady"
    if sig.blocked:
        return prev, f"scale-down held: {sig.blocked}"
    if goal == 0 and prev == 1:
        return 0, f"no load for {cfg.idle_timeout_s:g} s"
    return max(goal, prev - 1), (
        f"peak recommendation {sig.stable} over the last {cfg.stabilization_window_s:g} s"
    )


def _live_mark(mark: StartMark | None, fleet: _Fleet) -> StartMark | None:
    """The last scale-up's mark while its cold replicas are still on their way."""
    if mark is None or not fleet.starting or len(fleet.ready) + len(fleet.waking) >= mark.desired:
        return None
    return mark


def _hold(
    desired: int,
    prev: int,
    fleet: _Fleet,
    mark: StartMark | None,
    obs: VersionObservation,
    cfg: AutoscalingConfig,
) -> tuple[int, str | None]:
    """Starting replicas are capacity to come: while the last scale-up's cold
    replicas load, start no more unless the load outgrew them (panic factor) and,
    when the rate is known, arrivals grew since; then only in proportion."""
    wakeable = min(len(fleet.asleep), max(0, desired - fleet.coming))
    committed = max(prev, fleet.coming + wakeable)
    if mark is None or desired <= committed:
        return desired, None
    coming, load = fleet.coming + wakeable, fleet.load
    if load < cfg.panic_threshold * cfg.target_per_replica * coming:
        return committed, (
            f"holding at {committed}: {len(fleet.starting)} starting count as capacity to come "
            f"(load {load} < {cfg.panic_threshold:g}× their capacity)"
        )
    if mark.arrival_rate and obs.arrival_rate is not None:
        allowed = _ceil(mark.desired * obs.arrival_rate / mark.arrival_rate)
        if allowed < desired:
            return max(committed, allowed), (
                f"holding at {max(committed, allowed)}: arrivals are "
                f"{obs.arrival_rate / mark.arrival_rate:.2f}× the rate at the last start "
                f"(the load alone asks {desired})"
            )
    return desired, None


@dataclass(frozen=True, slots=True)
class _Plan:
    pool: int
    wake: tuple[str, ...] = ()
    cold: int = 0
    refill: int = 0
    sleep: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()


def _reconcile(fleet: _Fleet, desired: int, cfg: AutoscalingConfig) -> _Plan:
    """Actions that bring the replicas to ``desired`` serving + the standby pool."""
    pool = max(0, min(cfg.standby, cfg.max_replicas - desired))
    coming = fleet.coming
    warm = len(fleet.ready) + len(fleet.waking)
    if desired >= warm:
        # sleepers first (seconds), then the replicas already starting, then cold
        # starts; starting replicas left over (a refill of the pool) join the pool
        # instead of standing in for a sleeper that could serve now
        need = desired - warm
        wake = fleet.asleep[:need]
        asleep = fleet.asleep[len(wake) :]
        for_serving = min(len(fleet.starting), need - len(wake))
        spare = len(fleet.starting) - for_serving
        excess = max(0, len(asleep) + spare - pool)
        cancel = fleet.starting[: min(excess, spare)]  # newest first: least progress lost
        keep_asleep = max(0, pool - (spare - len(cancel)))
        return _Plan(
            pool=pool,
            wake=_ids(wake),
            cold=need - len(wake) - for_serving,
            refill=max(0, pool - len(asleep) - spare),
            drain=_ids(cancel) + _ids(asleep[keep_asleep:]),
        )
    surplus = coming - desired
    room = max(0, pool - len(fleet.asleep))
    # starting replicas go first: they serve nobody yet; while the pool has room they
    # are left to start and join it (a later decision sleeps them once READY)
    surplus_starting = min(len(fleet.starting), surplus)
    to_pool = min(surplus_starting, room)
    cancel = fleet.starting[: surplus_starting - to_pool]
    victims = fleet.ready[: min(len(fleet.ready), surplus - surplus_starting)]
    sleep = victims[: room - to_pool]
    in_pool = len(fleet.asleep) + to_pool + len(sleep)
    return _Plan(
        pool=pool,
        refill=max(0, pool - in_pool),
        sleep=_ids(sleep),
        drain=_ids(cancel) + _ids(victims[len(sleep) :]) + _ids(fleet.asleep[pool:]),
    )


def _reason(prev: int, desired: int, why: str, plan: _Plan) -> str:
    verb = "up" if desired > prev else "down" if desired < prev else "hold"
    head = f"{verb} {prev}→{desired}" if desired != prev else f"hold {desired}"
    acts = []
    if plan.wake:
        acts.append("wake " + ", ".join(plan.wake))
    if plan.cold:
        acts.append(f"start {plan.cold}")
    if plan.refill:
        acts.append(f"start {plan.refill} for standby")
    if plan.sleep:
        acts.append("sleep " + ", ".join(plan.sleep))
    if plan.drain:
        acts.append("drain " + ", ".join(plan.drain))
    return f"{head}: {why}" + ("; " + "; ".join(acts) if acts else "")


# -- small helpers ---------------------------------------------------------------------


def _check_continuity(obs: VersionObservation, state: PolicyState) -> None:
    if state.version is not None and state.version != obs.version:
        raise InvalidObservation(
            f"state belongs to version {state.version!r}, observation is of {obs.version!r}: "
            "keep one PolicyState per version"
        )
    if state.last_seen is not None and obs.now < state.last_seen:
        raise InvalidObservation(
            f"now ({obs.now:g}) is before the previous decision ({state.last_seen:g}): "
            "pass a monotonic clock"
        )


def _slo_breached(obs: VersionObservation, cfg: AutoscalingConfig) -> bool:
    pairs = ((obs.ttft_p90_s, cfg.slo_ttft_p90_s), (obs.tpot_p90_s, cfg.slo_tpot_p90_s))
    return any(seen is not None and slo is not None and seen > slo for seen, slo in pairs)


def _trend(points: list[tuple[float, float]]) -> float | None:
    """The typical change per second: the lower median of the steps between
    successive points. None over fewer than two steps. A single jump (a burst) is
    not a trend; growth in most steps of the window is."""
    steps = [(v1 - v0) / (t1 - t0) for (t0, v0), (t1, v1) in itertools.pairwise(points) if t1 > t0]
    return statistics.median_low(steps) if len(steps) >= 2 else None


def _within(samples: Iterable[Sample], now: float, window: float) -> tuple[Sample, ...]:
    return tuple(s for s in samples if s.t > now - window)


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPS))


def _clamp(n: int, cfg: AutoscalingConfig) -> int:
    return max(cfg.min_replicas, min(cfg.max_replicas, n))


def _ids(replicas: Iterable[ReplicaView]) -> tuple[str, ...]:
    return tuple(r.id for r in replicas)


def _victim_order(r: ReplicaView) -> tuple[int, int, float, str]:
    """Least work first: idle, then fewest requests, then fewest tokens left; among
    equals the newest (its prefix cache is the coldest), then by id."""
    return (*r.work, -r.since if r.since is not None else -math.inf, r.id)


def _newest_first(r: ReplicaView) -> tuple[float, str]:
    return (-r.since if r.since is not None else -math.inf, r.id)


def _oldest_first(r: ReplicaView) -> tuple[float, str]:
    return (r.since if r.since is not None else math.inf, r.id)
