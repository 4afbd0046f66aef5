"""The replica's lifecycle: a small, pure state machine.

```
STARTING --loaded, warmed up--> READY --drain / SIGTERM--> DRAINING --idle or timeout--> STOPPED
                                READY --sleep--> ASLEEP --wake--> READY
```

A replica that fails to load, or is told to stop before it is ready, goes straight
to STOPPED; an ASLEEP replica can be drained (it has nothing in flight). Nothing here
knows about HTTP or the engine: the server asks :meth:`Lifecycle.to` for each move
and reads :attr:`Lifecycle.state`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from lmfleet.errors import LmfleetError


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    ASLEEP = "asleep"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


_ALLOWED: dict[ReplicaState, frozenset[ReplicaState]] = {
    ReplicaState.STARTING: frozenset({ReplicaState.READY, ReplicaState.STOPPED}),
    ReplicaState.READY: frozenset({ReplicaState.DRAINING, ReplicaState.ASLEEP}),
    ReplicaState.ASLEEP: frozenset({ReplicaState.READY, ReplicaState.DRAINING}),
    ReplicaState.DRAINING: frozenset({ReplicaState.STOPPED}),
    ReplicaState.STOPPED: frozenset(),
}


class InvalidTransition(LmfleetError):
    """A lifecycle move that the current state does not allow (e.g. wake while
    draining). Recoverable: the state is unchanged."""

    def __init__(self, current: ReplicaState, target: ReplicaState) -> None:
        allowed = ", ".join(sorted(s.value for s in _ALLOWED[current])) or "nothing"
        super().__init__(
            f"cannot go from {current.value} to {target.value}; from {current.value} "
            f"the replica can go to: {allowed}"
        )
        self.current = current
        self.target = target


class Lifecycle:
    """The current state, when it was entered, and the allowed moves.

    ``on_change(old, new)`` is called after every successful move (metrics use it).
    """

    def __init__(
        self,
        on_change: Callable[[ReplicaState, ReplicaState], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = ReplicaState.STARTING
        self._clock = clock
        self._since = clock()
        self._on_change = on_change

    @property
    def state(self) -> ReplicaState:
        return self._state

    @property
    def seconds_in_state(self) -> float:
        return self._clock() - self._since

    @property
    def ready(self) -> bool:
        return self._state is ReplicaState.READY

    @property
    def accepting(self) -> bool:
        """Whether new generation requests are admitted."""
        return self._state is ReplicaState.READY

    def can(self, target: ReplicaState) -> bool:
        return target in _ALLOWED[self._state]

    def to(self, target: ReplicaState) -> ReplicaState:
        """Move to ``target``; returns the previous state. Raises ``InvalidTransition``."""
        if not self.can(target):
            raise InvalidTransition(self._state, target)
        old = self._state
        self._state = target
        self._since = self._clock()
        if self._on_change is not None:
            self._on_change(old, target)
        return old
