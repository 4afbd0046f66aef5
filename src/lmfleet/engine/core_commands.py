"""The one command protocol between the async engine and its core, and the one loop
that serves it, whether the core runs in a thread or in its own process.

Parent → core: tagged tuples ``(kind, payload)``, in batches. Core → parent: one
:class:`StepResult` per step (or per batch of commands while idle), with the step's
outputs, what the commands produced (rejections, call results) and fresh stats.
:func:`serve_core` is the loop; only how commands arrive (:class:`CommandInbox`) and
how results leave (``emit``) differ between :mod:`~lmfleet.engine.core_thread` and
:mod:`~lmfleet.engine.core_process`. :class:`CoreLink` is the parent side both
share: awaitable calls (sleep, wake) and the callbacks that feed the async engine.

Failure rules: a command that fails for one request (adding it) fails that request;
a failed call (sleep while busy) is returned to its caller; an exception from
``core.step()`` ends the loop, and the link reports the engine dead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lmfleet.engine.outputs import EngineCoreOutput, describe_error, request_failed
from lmfleet.engine.stats import EngineInfo, EngineStats
from lmfleet.errors import EngineDead, LmfleetError, RequestRejected

if TYPE_CHECKING:
    from lmfleet.engine.core import EngineCore

logger = logging.getLogger(__name__)

# ---- parent → core: ``(kind, payload)`` ------------------------------------------------
ADD = "add"  # payload: Request
ABORT = "abort"  # payload: list[str]
ABORT_ALL = "abort_all"  # payload: FinishReason
SLEEP = "sleep"  # payload: call id; result: seconds
WAKE = "wake"  # payload: call id; result: seconds
SHUTDOWN = "shutdown"  # payload: None

Command = tuple[str, Any]
#: commands answered with a :class:`CallResult`
CALLS = (SLEEP, WAKE)

#: how long the loop sleeps between polls while its requests wait for wake
ASLEEP_POLL_S = 0.5


# ---- core → parent ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CoreReady:
    """The model loaded: what the parent needs to serve without a core of its own."""

    info: EngineInfo
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class LoadFailed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class CallResult:
    call_id: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step's outputs (plus those of an abort_all), and what the commands before
    it produced: rejected requests and the results of calls."""

    stats: EngineStats
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    rejected: list[tuple[str, LmfleetError]] = field(default_factory=list)
    calls: list[CallResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Crashed:
    error: str  # repr of the exception: it may not pickle


# ---- the core's side -----------------------------------------------------------------
class CommandInbox(Protocol):
    def take(self, timeout: float | None) -> list[Command] | None:
        """The commands that arrived, waiting up to ``timeout`` seconds for the first
        (``None``: as long as it takes; 0: not at all); None when none came."""
        ...


@dataclass(slots=True)
class _Pending:
    """What one round of the loop gathers for its :class:`StepResult`."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    rejected: list[tuple[str, LmfleetError]] = field(default_factory=list)
    calls: list[CallResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outputs or self.rejected or self.calls)


def serve_core(core: EngineCore, inbox: CommandInbox, emit: Callable[[StepResult], None]) -> None:
    """Take commands (without waiting while there is work, blocking while idle), step,
    emit; until SHUTDOWN. An exception from a step propagates: the engine is dead."""
    core.runner.bind_thread()
    last_stats: EngineStats | None = None
    while True:
        if not core.has_unfinished():
            timeout: float | None = None  # idle: block until a command comes
        elif core.asleep:
            timeout = ASLEEP_POLL_S  # step() would return nothing until wake
        else:
            timeout = 0.0
        pending = _Pending()
        batch = inbox.take(timeout)
        if batch and not apply_commands(core, batch, pending):
            return
        if core.has_unfinished() and not core.asleep:
            pending.outputs.extend(core.step())
        stats = core.stats()
        if pending or stats != last_stats:
            emit(StepResult(stats, pending.outputs, pending.rejected, pending.calls))
            last_stats = stats


def apply_commands(core: EngineCore, batch: list[Command], pending: _Pending) -> bool:
    """Apply one batch of commands; False on SHUTDOWN."""
    for kind, payload in batch:
        if kind == ADD:
            _add(core, payload, pending)
        elif kind == ABORT:
            core.abort(payload)
        elif kind == ABORT_ALL:
            pending.outputs.extend(core.abort(list(core.scheduler.requests), payload))
        elif kind in CALLS:
            pending.calls.append(_call(core, kind, payload))
        elif kind == SHUTDOWN:
            return False
        else:
            raise ValueError(f"unknown engine command {kind!r}")
    return True


def _add(core: EngineCore, request: Any, pending: _Pending) -> None:
    try:
        core.add_request(request)
    except RequestRejected as exc:
        pending.rejected.append((request.request_id, exc))
    except Exception as exc:  # this request's own inputs: it fails alone
        logger.exception("request %s: cannot be added", request.request_id)
        pending.rejected.append(
            (request.request_id, request_failed(request.request_id, describe_error(exc)))
        )


def _call(core: EngineCore, kind: str, call_id: int) -> CallResult:
    try:
        value = core.sleep() if kind == SLEEP else core.wake()
    except Exception as exc:
        return CallResult(call_id, error=picklable_error(exc))
    return CallResult(call_id, value)


def picklable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a ``RuntimeError`` saying it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


# ---- the parent's side -------------------------------------------------------------------
class CoreLink:
    """The parent's end of a core, driven from one event loop: sends commands, awaits
    calls, and hands each :class:`StepResult` to ``on_step`` (call results already
    resolved) and a dead core's error to ``on_dead`` (once). Subclasses move the
    commands (:meth:`send`) and start and stop the core."""

    def __init__(
        self,
        *,
        on_step: Callable[[StepResult], None],
        on_dead: Callable[[BaseException], None],
    ) -> None:
        self._on_step = on_step
        self._on_dead = on_dead
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._closed = False
        self.dead: BaseException | None = None

    async def start(self) -> CoreReady:
        """Start the core and load the model; a load error is raised here."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stop the core; never hangs."""
        raise NotImplementedError

    def send(self, kind: str, payload: Any) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    async def call(self, kind: str) -> Any:
        """Run a call command (:data:`CALLS`) in the core between two steps; returns its
        value or raises its error, or ``EngineDead``."""
        if self.dead is not None or self._closed or self._loop is None:
            raise EngineDead(f"the engine core is not running: {self.dead!r}")
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = fut
        self.send(kind, call_id)
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    def _handle_step(self, msg: StepResult) -> None:
        for res in msg.calls:
            fut = self._calls.get(res.call_id)
            if fut is None or fut.done():
                continue
            if res.error is not None:
                fut.set_exception(res.error)
            else:
                fut.set_result(res.value)
        self._on_step(msg)

    def _died(self, exc: BaseException) -> None:
        if self.dead is not None:
            return
        self.dead = exc
        logger.error("%s", exc)
        self._fail_calls(exc)
        self._on_dead(exc)

    def _fail_calls(self, exc: BaseException) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(exc)
        self._calls.clear()
