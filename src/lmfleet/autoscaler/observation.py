"""The policy's hand-off objects, typed, frozen and checked: its config, what it is
told about one version, what it decides, and the state the caller keeps between
decisions. ``policy`` holds the logic; nothing here decides anything.

The controller (live), the simulator and the KEDA external scaler build these from
whatever they watch (the gateway's per-version metrics, a provider's replica list, a
virtual fleet); the policy reads nothing else. Times are seconds on the caller's
clock (monotonic live, virtual in the simulator): the policy never reads a clock.

Contract for callers: a replica the policy has asked to start must appear as
STARTING in the next observation, a woken one as WAKING (or READY), a slept one as
ASLEEP, a drained one as DRAINING, until the provider reports otherwise. An
observation that forgets an action in progress makes the policy ask for it again.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmfleet.errors import ConfigError, LmfleetError

if TYPE_CHECKING:
    from lmfleet.autoscaler.baselines import KedaState


class InvalidObservation(LmfleetError):
    """An observation is inconsistent (negative counts, duplicate replica ids, time
    going backwards). A bug in the caller, not in the fleet: the policy makes no
    decision from it. Recoverable: the next, correct observation is decided as usual."""


class ReplicaPhase(enum.StrEnum):
    """A replica as the autoscaler counts it.

    The replica server's own states (starting, ready, asleep, draining, stopped) plus
    what only the controller knows: WAKING (asked to wake, not READY yet) and DEAD
    (exited or failing its liveness probe; the controller removes it and the policy
    replaces it). A replica taken out of rotation, draining or stopping is DRAINING:
    it is leaving and counts for nothing. A replica being put to sleep counts as ASLEEP.
    """

    STARTING = "starting"
    WAKING = "waking"
    READY = "ready"
    ASLEEP = "asleep"
    DRAINING = "draining"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica of the version.

    ``in_flight`` is every request the replica holds: those it runs and those queued
    inside it. ``waiting`` is the part of ``in_flight`` still queued in the replica
    (its ``/state`` ``waiting``). A live controller passes, per replica, the larger of
    the gateway's outstanding count and the replica's ``running + waiting``, since
    each lags the other by a poll. ``remaining_tokens`` estimates the output tokens
    its requests still have to generate (0 when unknown). ``since`` is when it
    entered its current state, on the observation's clock (None when unknown).
    """

    id: str
    state: ReplicaPhase
    in_flight: int = 0
    waiting: int = 0
    remaining_tokens: int = 0
    since: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidObservation(f"replica id must be a non-empty string, got {self.id!r}")
        try:
            object.__setattr__(self, "state", ReplicaPhase(self.state))
        except ValueError:
            allowed = ", ".join(p.value for p in ReplicaPhase)
            raise InvalidObservation(
                f"replica {self.id}: state {self.state!r} is not one of: {allowed}"
            ) from None
        for name in ("in_flight", "waiting", "remaining_tokens"):
            _check_count(f"replica {self.id}: {name}", getattr(self, name))
        if self.waiting > self.in_flight:
            raise InvalidObservation(
                f"replica {self.id}: waiting ({self.waiting}) is part of in_flight "
                f"({self.in_flight}), so it cannot be larger; pass in_flight = running + waiting"
            )
        if self.since is not None:
            _check_time(f"replica {self.id}: since", self.since)

    @property
    def work(self) -> tuple[int, int]:
        """How much a scale-down would disturb it: requests held, then tokens left."""
        return (self.in_flight, self.remaining_tokens)


@dataclass(frozen=True, slots=True)
class VersionObservation:
    """One version of one model at time ``now``.

    ``queue_depth`` is the gateway's admission queue for the version (requests not
    yet sent to any replica); the replicas' own queues are in their views.
    ``arrival_rate`` (requests/s) and ``output_tokens_per_s`` are over the gateway's
    recent window; ``ttft_p90_s`` / ``tpot_p90_s`` likewise. ``time_to_ready_s`` and
    ``wake_s`` are the version's measured cold start (start to READY) and wake (to
    READY): None until one has been measured, then the policy's config defaults stop
    applying. Every optional figure may be None when the caller does not measure it.
    """

    now: float
    version: str
    queue_depth: int = 0
    replicas: tuple[ReplicaView, ...] = ()
    arrival_rate: float | None = None
    output_tokens_per_s: float | None = None
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    time_to_ready_s: float | None = None
    wake_s: float | None = None

    def __post_init__(self) -> None:
        _check_time("now", self.now)
        if not isinstance(self.version, str) or not self.version:
            raise InvalidObservation(f"version must be a non-empty string, got {self.version!r}")
        _check_count("queue_depth", self.queue_depth)
        replicas = tuple(self.replicas)
        object.__setattr__(self, "replicas", replicas)
        seen: set[str] = set()
        for r in replicas:
            if not isinstance(r, ReplicaView):
                raise InvalidObservation(f"replicas must be ReplicaView, got {type(r).__name__}")
            if r.id in seen:
                raise InvalidObservation(f"replica id {r.id!r} appears twice in {self.version}")
            seen.add(r.id)
        for name in (
            "arrival_rate",
            "output_tokens_per_s",
            "ttft_p90_s",
            "tpot_p90_s",
            "time_to_ready_s",
            "wake_s",
        ):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
            ):
                raise InvalidObservation(f"{name} must be a number ≥ 0 or None, got {value!r}")
            if value is not None and math.isinf(value):
                raise InvalidObservation(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True, slots=True)
class AutoscalingConfig:
    """The knobs of one version's policy; docs/autoscaler.md gives each default's
    reason. ``max_replicas`` bounds every replica the policy keeps: serving,
    starting, waking and asleep (the standby pool comes out of it); replicas
    already draining are leaving and do not count."""

    min_replicas: int = 1
    max_replicas: int = 4
    standby: int = 0
    #: requests per replica (its queue + what it runs) the fleet is sized for
    target_per_replica: float = 16.0
    #: how often the caller (controller, simulator) decides; the policy reads its own
    #: times from the observations
    interval_s: float = 2.0
    stabilization_window_s: float = 60.0
    #: load ≥ this × target × capacity to come is a burst
    panic_threshold: float = 2.0
    #: no scale-down until this long after the burst condition last held
    panic_window_s: float = 60.0
    #: with min_replicas = 0: seconds without any load before the last replica goes
    idle_timeout_s: float = 300.0
    #: changes of scale direction allowed per reversal_window_s (oscillation bound)
    max_reversals: int = 4
    reversal_window_s: float = 600.0
    #: project the load ahead by the time a new replica takes when it is growing
    scale_ahead: bool = True
    trend_window_s: float = 30.0
    #: the projection never exceeds this × the current load
    ahead_max_factor: float = 2.0
    #: cold start and wake assumed until the observation carries measured ones
    default_time_to_ready_s: float = 60.0
    default_wake_s: float = 2.0
    #: optional SLO guard: one more replica when a p90 is over its target
    slo_ttft_p90_s: float | None = None
    slo_tpot_p90_s: float | None = None
    slo_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas", "standby", "max_reversals"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"autoscaling.{name} must be an integer ≥ 0, got {value!r}")
        if self.max_replicas < 1:
            raise ConfigError("autoscaling.max_replicas must be ≥ 1 (a version needs a replica)")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                f"({self.max_replicas}): raise max_replicas or lower min_replicas"
            )
        if self.standby > self.max_replicas:
            raise ConfigError(
                f"autoscaling.standby ({self.standby}) is above max_replicas "
                f"({self.max_replicas}): sleeping replicas count toward max_replicas"
            )
        if self.max_reversals < 1:
            raise ConfigError("autoscaling.max_reversals must be ≥ 1 (one scale-up and back)")
        _positive("target_per_replica", self.target_per_replica)
        _positive("interval_s", self.interval_s)
        for name in (
            "stabilization_window_s",
            "panic_window_s",
            "idle_timeout_s",
            "reversal_window_s",
            "trend_window_s",
            "default_time_to_ready_s",
            "default_wake_s",
            "slo_cooldown_s",
        ):
            _non_negative(name, getattr(self, name))
        if not _number(self.panic_threshold) or self.panic_threshold <= 1:
            raise ConfigError(
                f"autoscaling.panic_threshold must be > 1 (a multiple of capacity), "
                f"got {self.panic_threshold!r}; Knative uses 2.0"
            )
        if not _number(self.ahead_max_factor) or self.ahead_max_factor < 1:
            raise ConfigError(
                f"autoscaling.ahead_max_factor must be ≥ 1, got {self.ahead_max_factor!r}"
            )
        if not isinstance(self.scale_ahead, bool):
            raise ConfigError(
                f"autoscaling.scale_ahead must be true or false, got {self.scale_ahead!r}"
            )
        for name in ("slo_ttft_p90_s", "slo_tpot_p90_s"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)


#: the numbers a decision used, by name
Inputs = Mapping[str, float | int | bool | str | None]


@dataclass(frozen=True, slots=True)
class Sample:
    """One past decision's load, arrival rate and (raw) recommendation."""

    t: float
    load: int
    arrival_rate: float | None
    recommendation: int


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A change of ``desired``: +1 up, -1 down; ``reversal`` when it turned around."""

    t: float
    direction: int
    reversal: bool


@dataclass(frozen=True, slots=True)
class StartMark:
    """The last scale-up that started cold replicas: its time, ``desired`` and the
    arrival rate then. While those replicas load it holds further cold starts."""

    t: float
    desired: int
    arrival_rate: float | None


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between decisions; the caller stores it per
    version and passes it back. ``PolicyState()`` is the state before the first one."""

    version: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    desired: int | None = None
    samples: tuple[Sample, ...] = ()
    events: tuple[ScaleEvent, ...] = ()
    last_direction: int = 0
    idle_since: float | None = None
    panic_until: float | None = None
    last_up_at: float | None = None
    start_mark: StartMark | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now for one version.

    ``desired``: replicas to serve (READY, WAKING or STARTING toward READY).
    ``standby``: replicas to keep ASLEEP. ``start``: cold replicas to start now; the
    ones beyond ``desired`` refill the pool: when READY, a later decision lists them
    in ``sleep``. ``wake``: ASLEEP replicas to wake. ``sleep``: READY replicas to take
    out of rotation and put to sleep once idle. ``drain``: replicas to take out of
    rotation, drain and stop (STARTING ones are stopped, ASLEEP ones just stopped).
    ``inputs``: every number the decision used. ``state``: pass it to the next call
    (the state of the policy that decided: a baseline keeps its own).
    """

    desired: int
    standby: int
    start: int
    wake: tuple[str, ...]
    sleep: tuple[str, ...]
    drain: tuple[str, ...]
    reason: str
    inputs: Inputs
    state: PolicyState | KedaState

    @property
    def acts(self) -> bool:
        """Whether the provider has anything to do."""
        return bool(self.start or self.wake or self.sleep or self.drain)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidObservation(f"{name} must be an integer ≥ 0, got {value!r}")


def _check_time(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidObservation(f"{name} must be a finite number of seconds, got {value!r}")


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _positive(name: str, value: object) -> None:
    if not _number(value) or value <= 0:  # type: ignore[operator]
        raise ConfigError(f"autoscaling.{name} must be a number > 0, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if not _number(value) or value < 0:  # type: ignore[operator]
        raise ConfigError(f"autoscaling.{name} must be a number ≥ 0, got {value!r}")
