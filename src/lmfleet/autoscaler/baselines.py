"""Baseline policies to compare lmfleet's against, in the same controller and
harness: ``keda_hpa(observation, config, state)``, what a Kubernetes operator gets
today from KEDA + the HPA with the trigger vLLM production-stack recommends.

Same shape and contract as :func:`lmfleet.autoscaler.policy.decide`: pure (no I/O,
no clock, no randomness), the caller keeps the returned state and passes it back.
It models the documented algorithms and their defaults (each knob of
:class:`KedaConfig` names its source); it is not lmfleet's policy with other
numbers, so nothing here imports ``policy``.

One decision, in order:

1. **Sample** (KEDA ``pollingInterval``): every ``polling_interval_s`` the metric is
   read: the version's waiting requests, the gateway's queue plus every replica's
   own waiting (production-stack's ``vllm:num_requests_waiting``, summed). Between
   samples the HPA sees the last one, so a burst between two polls is unseen until
   the next.
2. **Activate / deactivate** (KEDA, at each sample): at zero replicas a sample above
   ``activation_threshold`` scales to one; with ``min_replicas = 0`` the last
   replica goes once no sample has been above it for ``cooldown_period_s``.
3. **HPA sync** (every ``sync_period_s``, while replicas > 0), the HPA v2 algorithm
   for an External metric with an AverageValue target: proposal =
   ceil(waiting / threshold) unless |waiting / (threshold × pods) − 1| ≤
   ``tolerance``; up to the lowest proposal of the up window (0 s: at once), down
   to the highest of the last ``scale_down_stabilization_s``; at most
   max(+``scale_up_percent`` %, +``scale_up_pods``) per ``scale_up_period_s``;
   clamped to [max(1, min), max].
4. **ReplicaSet** (every decision): create or delete pods to match the count.
   Victims as a ReplicaSet picks them: not ready (starting) first, then the most
   recently ready; never by how busy they are. A victim is drained (the caller's
   drain timeout stands for ``terminationGracePeriodSeconds``).

No standby (it never sleeps or wakes a replica; an asleep one is stopped), no
load-time awareness (starting pods count as pods in the ratio, so a waiting queue
that grows while they load keeps scaling up), no arrival rate, no SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

from lmfleet.autoscaler.observation import (
    Decision,
    InvalidObservation,
    ReplicaPhase,
    ReplicaView,
    VersionObservation,
)
from lmfleet.errors import ConfigError

#: tolerance for float rounding when a metric divides evenly by the threshold
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class KedaConfig:
    """The knobs of the KEDA + HPA baseline, with the defaults their projects
    document (the fleet file's ``autoscaling.keda`` section; the counts come from
    ``replicas``)."""

    #: ScaledObject minReplicaCount (KEDA's default is 0; the fleet file's
    #: ``replicas.min`` sets it). 0 lets KEDA scale to zero
    min_replicas: int = 1
    #: ScaledObject maxReplicaCount (KEDA's default is 100; ``replicas.max`` sets it)
    max_replicas: int = 4
    #: waiting requests per replica, an AverageValue target: vLLM production-stack's
    #: recommended trigger is ``vllm:num_requests_waiting`` with threshold 5
    threshold: float = 5.0
    #: KEDA activationThreshold (default 0): the trigger is active when the metric
    #: is above it; at zero replicas an active trigger scales to one
    activation_threshold: float = 0.0
    #: how often the metric is sampled: production-stack's pollingInterval is 15 s
    #: (KEDA's default 30 s); the Prometheus series behind it is no fresher
    polling_interval_s: float = 15.0
    #: KEDA cooldownPeriod (default 300 s; production-stack uses 360 s): with
    #: min_replicas 0, how long the trigger must be inactive before 1 → 0
    cooldown_period_s: float = 300.0
    #: kube-controller-manager --horizontal-pod-autoscaler-sync-period (default 15 s)
    sync_period_s: float = 15.0
    #: --horizontal-pod-autoscaler-tolerance (default 0.1): no change while the
    #: metric is within 10 % of the target
    tolerance: float = 0.1
    #: HPA v2 default scaleUp policies, selectPolicy Max: +100 % or +4 pods,
    #: whichever is more, per 15 s
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    scale_up_period_s: float = 15.0
    #: HPA v2 default scaleUp stabilizationWindowSeconds: 0 (up at once)
    scale_up_stabilization_s: float = 0.0
    #: HPA v2 default scaleDown stabilizationWindowSeconds: 300 (the highest
    #: proposal of the last five minutes)
    scale_down_stabilization_s: float = 300.0
    #: HPA v2 default scaleDown policy: 100 % per 15 s (no rate limit in practice)
    scale_down_percent: float = 100.0
    scale_down_period_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas", "scale_up_pods"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"autoscaling.keda.{name} must be an integer ≥ 0, got {value!r}")
        if self.max_replicas < 1:
            raise ConfigError("max_replicas must be ≥ 1 (a version needs a replica)")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"min_replicas ({self.min_replicas}) is above max_replicas "
                f"({self.max_replicas}): raise max_replicas or lower min_replicas"
            )
        for name in (
            "threshold",
            "polling_interval_s",
            "sync_period_s",
            "scale_up_percent",
            "scale_up_period_s",
            "scale_down_percent",
            "scale_down_period_s",
        ):
            if not _number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(
                    f"autoscaling.keda.{name} must be a number > 0, got {getattr(self, name)!r}"
                )
        for name in (
            "activation_threshold",
            "cooldown_period_s",
            "scale_up_stabilization_s",
            "scale_down_stabilization_s",
        ):
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(
                    f"autoscaling.keda.{name} must be a number ≥ 0, got {getattr(self, name)!r}"
                )
        if not _number(self.tolerance) or not 0 <= self.tolerance < 1:
            raise ConfigError(
                f"autoscaling.keda.tolerance must be in [0, 1), got {self.tolerance!r}; "
                "the HPA's default is 0.1"
            )
        if self.scale_down_percent > 100:
            raise ConfigError(
                f"autoscaling.keda.scale_down_percent must be ≤ 100, got {self.scale_down_percent!r}"
            )

    @property
    def standby(self) -> int:
        """KEDA keeps no warm standby."""
        return 0


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One HPA sync's proposal before stabilization (what its windows remember)."""

    t: float
    replicas: int


@dataclass(frozen=True, slots=True)
class ReplicaChange:
    """A change of the replica count the HPA made (its scale events, for the rate
    limits): ``delta`` > 0 up, < 0 down."""

    t: float
    delta: int


@dataclass(frozen=True, slots=True)
class KedaState:
    """What KEDA and the HPA remember between decisions; ``KedaState()`` before the
    first. ``desired`` is the Deployment's replica count."""

    version: str | None = None
    last_seen: float | None = None
    desired: int | None = None
    next_poll: float | None = None
    next_sync: float | None = None
    #: the last sample of the metric and when it was taken
    metric: int | None = None
    metric_at: float | None = None
    #: the last sample above the activation threshold (the cooldown counts from it)
    last_active: float | None = None
    recommendations: tuple[Recommendation, ...] = ()
    changes: tuple[ReplicaChange, ...] = ()


def keda_hpa(
    observation: VersionObservation,
    config: KedaConfig,
    state: KedaState | None = None,
) -> Decision:
    """Decide one version's replicas as KEDA + the HPA would (module docstring).
    Raises :class:`InvalidObservation` when the observation does not follow
    ``state`` (another version, time going backwards)."""
    obs, cfg = observation, config
    state = state if state is not None else KedaState()
    _check_continuity(obs, state)
    now = obs.now
    pods = _Pods.of(obs)
    prev = state.desired if state.desired is not None else _clamp(len(pods.serving), cfg)
    desired, why = prev, "steady"
    inputs: dict[str, float | int | bool | str | None] = pods.inputs()

    # 1-2. KEDA: sample the metric, activate or deactivate
    poll = _keda_poll(now, pods.waiting, prev, cfg, state)
    metric, desired = poll.metric, poll.desired
    why = poll.why or why

    # 3. the HPA (disabled at zero replicas: KEDA owns 0 ↔ 1)
    next_sync = state.next_sync if state.next_sync is not None else now
    recommendations, changes = state.recommendations, state.changes
    if state.desired is None:
        # a new HPA remembers the count it found, so it does not scale down at once
        recommendations = (Recommendation(now, prev),)
    synced = False
    if now >= next_sync:
        next_sync = _next_due(next_sync, now, cfg.sync_period_s)
        if desired > 0 and metric is not None:
            synced = True
            hpa = _hpa_sync(now, metric, desired, len(pods.serving), cfg, recommendations, changes)
            recommendations = hpa.recommendations
            inputs.update(hpa.inputs)
            if hpa.desired != desired:
                changes = (*changes, ReplicaChange(now, hpa.desired - desired))
                why = hpa.why
            elif why == "steady":
                why = hpa.why
            desired = hpa.desired
    horizon = max(cfg.scale_up_period_s, cfg.scale_down_period_s)
    changes = tuple(c for c in changes if c.t > now - horizon)

    # 4. the ReplicaSet
    start, drain = _reconcile(pods, desired)
    inputs.update(
        metric=metric,
        metric_age_s=None if poll.metric_at is None else now - poll.metric_at,
        sampled=poll.sampled,
        synced=synced,
        threshold=cfg.threshold,
        previous_desired=prev,
        last_active=poll.last_active,
        inactive_for_s=None if poll.last_active is None else now - poll.last_active,
    )
    return Decision(
        desired=desired,
        standby=0,
        start=start,
        wake=(),
        sleep=(),
        drain=drain,
        reason=_reason(prev, desired, why, start, drain),
        inputs=MappingProxyType(inputs),
        state=KedaState(
            version=obs.version,
            last_seen=now,
            desired=desired,
            next_poll=poll.next_poll,
            next_sync=next_sync,
            metric=metric,
            metric_at=poll.metric_at,
            last_active=poll.last_active,
            recommendations=recommendations,
            changes=changes,
        ),
    )


# -- the steps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pods:
    """The observation's replicas as a ReplicaSet sees them."""

    queue_depth: int
    #: starting and waking (not ready), then ready: the pods of the ReplicaSet
    not_ready: tuple[ReplicaView, ...]
    ready: tuple[ReplicaView, ...]
    asleep: tuple[ReplicaView, ...]
    draining: int
    dead: int

    @classmethod
    def of(cls, obs: VersionObservation) -> _Pods:
        by_state: dict[ReplicaPhase, list[ReplicaView]] = {p: [] for p in ReplicaPhase}
        for r in obs.replicas:
            by_state[r.state].append(r)
        not_ready = by_state[ReplicaPhase.STARTING] + by_state[ReplicaPhase.WAKING]
        return cls(
            queue_depth=obs.queue_depth,
            not_ready=tuple(sorted(not_ready, key=_newest_first)),
            ready=tuple(sorted(by_state[ReplicaPhase.READY], key=_newest_first)),
            asleep=tuple(sorted(by_state[ReplicaPhase.ASLEEP], key=lambda r: r.id)),
            draining=len(by_state[ReplicaPhase.DRAINING]),
            dead=len(by_state[ReplicaPhase.DEAD]),
        )

    @property
    def serving(self) -> tuple[ReplicaView, ...]:
        """Every pod, in the order a ReplicaSet deletes them."""
        return self.not_ready + self.ready

    @property
    def waiting(self) -> int:
        """The trigger's metric: the gateway's queue and the replicas' own."""
        return self.queue_depth + sum(r.waiting for r in self.serving)

    def inputs(self) -> dict[str, float | int | bool | str | None]:
        return {
            "waiting": self.waiting,
            "queue_depth": self.queue_depth,
            "in_flight": sum(r.in_flight for r in self.serving),
            "ready": len(self.ready),
            "not_ready": len(self.not_ready),
            "asleep": len(self.asleep),
            "draining": self.draining,
            "dead": self.dead,
        }


@dataclass(frozen=True, slots=True)
class _Poll:
    sampled: bool
    metric: int | None
    metric_at: float | None
    last_active: float | None
    next_poll: float
    desired: int
    why: str | None


def _keda_poll(now: float, waiting: int, desired: int, cfg: KedaConfig, state: KedaState) -> _Poll:
    """KEDA's loop, when a poll is due: sample the metric; at zero an active trigger
    scales to one, and with ``min_replicas`` 0 the cooldown after the last active
    sample scales to zero. Between polls the last sample stands."""
    next_poll = state.next_poll if state.next_poll is not None else now
    if now < next_poll:
        return _Poll(False, state.metric, state.metric_at, state.last_active, next_poll,
                     desired, None)  # fmt: skip
    active = waiting > cfg.activation_threshold
    # a fresh ScaledObject counts its cooldown from when it was first seen
    last_active = now if active or state.last_active is None else state.last_active
    why = None
    if desired == 0 and active:
        desired = max(cfg.min_replicas, 1)
        why = f"KEDA: {waiting} waiting > activation {cfg.activation_threshold:g}"
    elif (
        desired > 0
        and not active
        and cfg.min_replicas == 0
        and now - last_active >= cfg.cooldown_period_s
    ):
        desired = 0
        why = f"KEDA: no waiting request above activation for {cfg.cooldown_period_s:g} s"
    next_poll = _next_due(next_poll, now, cfg.polling_interval_s)
    return _Poll(True, waiting, now, last_active, next_poll, desired, why)


@dataclass(frozen=True, slots=True)
class _Sync:
    desired: int
    why: str
    recommendations: tuple[Recommendation, ...]
    inputs: dict[str, float | int | bool | str | None]


def _hpa_sync(
    now: float,
    metric: int,
    current: int,
    pods: int,
    cfg: KedaConfig,
    past: tuple[Recommendation, ...],
    changes: tuple[ReplicaChange, ...],
) -> _Sync:
    """One HPA reconcile of an External AverageValue metric: the proposal, its
    stabilization, the rate limits, the bounds."""
    status = pods if pods > 0 else current
    ratio = metric / (cfg.threshold * status)
    within = abs(ratio - 1.0) <= cfg.tolerance
    proposal = status if within else _ceil(metric / cfg.threshold)
    # stabilization: the lowest proposal of the up window, the highest of the down one
    up_cut, down_cut = now - cfg.scale_up_stabilization_s, now - cfg.scale_down_stabilization_s
    up_rec = min([r.replicas for r in past if r.t > up_cut] + [proposal])
    down_rec = max([r.replicas for r in past if r.t > down_cut] + [proposal])
    stabilized = min(max(current, up_rec), down_rec)
    # rate limits, from the count at the start of each policy's period
    added = sum(c.delta for c in changes if c.delta > 0 and c.t > now - cfg.scale_up_period_s)
    removed = -sum(c.delta for c in changes if c.delta < 0 and c.t > now - cfg.scale_down_period_s)
    start_up, start_down = current - added, current + removed
    up_limit = max(_ceil(start_up * (1 + cfg.scale_up_percent / 100)), start_up + cfg.scale_up_pods)
    down_limit = int(start_down * (1 - cfg.scale_down_percent / 100))
    if stabilized > current:
        desired = min(stabilized, max(up_limit, current))
    elif stabilized < current:
        desired = max(stabilized, min(down_limit, current))
    else:
        desired = current
    desired = max(max(1, cfg.min_replicas), min(cfg.max_replicas, desired))
    horizon = max(cfg.scale_up_stabilization_s, cfg.scale_down_stabilization_s)
    recs = (*(r for r in past if r.t > now - horizon), Recommendation(now, proposal))
    if within:
        why = (
            f"HPA: {metric / status:.2f} waiting per replica is within "
            f"{cfg.tolerance:.0%} of {cfg.threshold:g}"
        )
    else:
        why = f"HPA: {metric} waiting / {cfg.threshold:g} per replica = {proposal}"
    if stabilized > proposal and desired > proposal:
        why += (
            f"; held at {stabilized}, the highest proposal of the last "
            f"{cfg.scale_down_stabilization_s:g} s"
        )
    if current < desired < stabilized:
        why += (
            f"; at most {desired} now (+{cfg.scale_up_percent:g} % or "
            f"+{cfg.scale_up_pods} per {cfg.scale_up_period_s:g} s)"
        )
    return _Sync(
        desired=desired,
        why=why,
        recommendations=recs,
        inputs={
            "usage_ratio": ratio,
            "within_tolerance": within,
            "proposal": proposal,
            "stabilized": stabilized,
            "scale_up_limit": up_limit,
            "scale_down_limit": down_limit,
        },
    )


def _reconcile(pods: _Pods, desired: int) -> tuple[int, tuple[str, ...]]:
    """The ReplicaSet: create the missing pods, delete the surplus in its order
    (not ready first, then the most recently ready). Sleepers are not its pods."""
    serving = pods.serving
    drain = tuple(r.id for r in pods.asleep)
    if len(serving) <= desired:
        return desired - len(serving), drain
    return 0, tuple(r.id for r in serving[: len(serving) - desired]) + drain


def _reason(prev: int, desired: int, why: str, start: int, drain: tuple[str, ...]) -> str:
    head = (
        f"{'up' if desired > prev else 'down'} {prev}→{desired}"
        if desired != prev
        else (f"hold {desired}")
    )
    acts = ([f"start {start}"] if start else []) + (["drain " + ", ".join(drain)] if drain else [])
    return f"{head}: {why}" + ("; " + "; ".join(acts) if acts else "")


# -- small helpers ---------------------------------------------------------------------


def _check_continuity(obs: VersionObservation, state: KedaState) -> None:
    if state.version is not None and state.version != obs.version:
        raise InvalidObservation(
            f"state belongs to version {state.version!r}, observation is of {obs.version!r}: "
            "keep one KedaState per version"
        )
    if state.last_seen is not None and obs.now < state.last_seen:
        raise InvalidObservation(
            f"now ({obs.now:g}) is before the previous decision ({state.last_seen:g}): "
            "pass a monotonic clock"
        )


def _next_due(due: float, now: float, period: float) -> float:
    """The first time on ``due``'s grid of ``period`` after ``now``: a loop that
    ran late keeps its phase and skips what it missed."""
    return due + period * (math.floor((now - due) / period + _EPS) + 1)


def _newest_first(r: ReplicaView) -> tuple[float, str]:
    """The most recent in its state first (``since`` unknown: first), then by id."""
    return (-r.since if r.since is not None else -math.inf, r.id)


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPS))


def _clamp(n: int, cfg: KedaConfig) -> int:
    return max(cfg.min_replicas, min(cfg.max_replicas, n))


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
