"""The provider interface: how the controller starts, wakes, sleeps, drains and stops
replicas, whatever runs them (child processes of ``lmfleet serve`` here, pods on
Kubernetes later). The controller speaks only this interface and these hand-off
objects; it never sees a process, a pod or a port file.

Taking a replica out of rotation is the gateway's job, not a provider's: the
controller does it before it calls :meth:`Provider.drain` or :meth:`Provider.sleep`,
so that no new request reaches a replica that is about to leave.

```
start(spec) -> STARTING --wait_ready--> READY --sleep--> ASLEEP --wake--> WAKING -> READY
READY / ASLEEP / STARTING --drain or stop--> DRAINING --exited--> STOPPED (and forgotten)
any --exited unasked, liveness failing, load budget spent--> DEAD (listed until stop)
```
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lmfleet.autoscaler.observation import ReplicaPhase
from lmfleet.errors import ConfigError, LmfleetError


class ProviderError(LmfleetError):
    """Base class of what a provider raises on purpose."""


class UnknownReplica(ProviderError):
    """No replica has that id: it was never started, or it stopped and was forgotten.
    Recoverable: nothing changed."""


class ReplicaActionFailed(ProviderError):
    """The replica refused or could not do what was asked (sleep with requests in
    flight, wake while draining, no answer in time). Recoverable: the replica keeps
    its state; the message says what it answered."""


class ReplicaStartFailed(ProviderError):
    """The replica exited, failed its liveness probe or was not READY within its load
    budget. It has been killed and is listed as DEAD until ``stop``; the message
    names its log."""


class ReplicaStatus(enum.StrEnum):
    """A replica as its provider knows it: the server's own state, plus WAKING (asked
    to wake, not READY yet), STOPPED (exited when asked to) and DEAD (exited unasked,
    failing liveness, or never READY within its load budget)."""

    STARTING = "starting"
    WAKING = "waking"
    READY = "ready"
    ASLEEP = "asleep"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value

    @property
    def phase(self) -> ReplicaPhase | None:
        """How the policy counts it; None for a STOPPED replica, which is gone."""
        return None if self is ReplicaStatus.STOPPED else ReplicaPhase(self.value)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """What to run for one replica of a version.

    ``model`` is what ``lmfleet serve`` takes (a checkpoint directory, a GGUF, a
    built-in name or ``sim:PROFILE``); ``engine_args`` the rest of its flags (e.g.
    ``("--served-model-name", "chat", "--version-label", "v2", "--quantization",
    "int8")``); ``version`` the key the controller groups replicas by (e.g.
    ``"chat/v2"``). ``load_timeout_s`` is the load budget: a replica not READY
    that long after its start is killed and reported DEAD. ``drain_timeout_s`` is
    how long a drain lets running requests finish before the replica aborts them.
    """

    model: str
    version: str
    engine_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    load_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("model", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"replica spec: {name} must be a non-empty string, got {value!r}")
        args = tuple(self.engine_args)
        if not all(isinstance(a, str) for a in args):
            raise ConfigError(f"replica spec: engine_args must be strings, got {args!r}")
        object.__setattr__(self, "engine_args", args)
        env = dict(self.env)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ConfigError("replica spec: env must map strings to strings")
        object.__setattr__(self, "env", env)
        for name in ("load_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"replica spec: {name} must be a number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ReplicaHandle:
    """A snapshot of one replica. Times are ``time.monotonic()`` seconds (the
    controller's clock): ``started_at`` when it was launched, ``since`` when it
    entered ``state``, ``ready_at`` when it first became READY. ``wake_s`` is its
    last wake as the provider measured it (request to READY). ``detail`` says what
    it is doing or why it died."""

    id: str
    version: str
    state: ReplicaStatus
    url: str | None
    pid: int | None
    log_path: Path | None
    started_at: float
    since: float
    ready_at: float | None = None
    wake_s: float | None = None
    exit_code: int | None = None
    detail: str = ""

    @property
    def time_to_ready_s(self) -> float | None:
        """The measured cold start: launch to READY (None until READY)."""
        return None if self.ready_at is None else self.ready_at - self.started_at


class Provider(Protocol):
    """What the controller needs from whatever runs replicas. Every method is a
    coroutine on the controller's event loop; none blocks it."""

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Launch a replica and return at once, STARTING. It loads in the background;
        :meth:`wait_ready` or :meth:`list` tell when it is READY or DEAD."""
        ...

    async def wait_ready(self, replica_id: str) -> ReplicaHandle:
        """Wait until the replica is READY (returned) or DEAD (raises
        ``ReplicaStartFailed``); the spec's load budget bounds the wait."""
        ...

    async def wake(self, replica_id: str) -> ReplicaHandle:
        """ASLEEP → WAKING → READY; returns once READY. A READY replica is returned
        as it is; any other state raises ``ReplicaActionFailed``."""
        ...

    async def sleep(self, replica_id: str) -> ReplicaHandle:
        """READY → ASLEEP (accelerator memory freed, weights kept in host memory).
        Take it out of rotation first: a replica with requests in flight refuses
        (``ReplicaActionFailed``)."""
        ...

    async def drain(self, replica_id: str, timeout_s: float | None = None) -> ReplicaHandle:
        """Stop admitting, let what runs finish (up to ``timeout_s``, default the
        spec's drain timeout), then stop; killed only when still there after a
        grace beyond that. Returns the final, STOPPED handle and forgets it."""
        ...

    async def stop(self, replica_id: str, *, grace_s: float | None = None) -> ReplicaHandle:
        """Stop a replica (the server still drains what it holds); killed when still
        there after ``grace_s`` (default: its drain timeout and a margin; 0 kills at
        once). Also how a DEAD replica is forgotten. Returns the final handle."""
        ...

    async def list(self) -> list[ReplicaHandle]:
        """Every replica not yet forgotten, with its live state, in start order."""
        ...

    async def close(self, *, grace_s: float | None = None) -> None:
        """Stop every replica as :meth:`stop` does (``grace_s=0``: kill them at once)
        and release what the provider holds; afterwards no replica it started is
        left running."""
        ...
