"""The engine core in its own process (opt-in), the way vLLM V1 runs it.

The child (a ``spawn`` process) builds ``EngineCore(config)`` and loops: take
commands without blocking while it has work, block while idle, ``step()``, send the
step's ``EngineCoreOutput``s with a fresh ``EngineStats``. The parent keeps the
tokenizer and the output processor, so detokenization and HTTP never share the GIL
with the step loop. The price is a process and one pickle round trip per step.

Messages travel over two one-way ``multiprocessing`` pipes, pickled and batched:
parent → child, one list of tagged command tuples per send; child → parent, one
frozen dataclass per step (or per batch of commands while idle).

:class:`CoreProcessClient` is the parent side, driven from one asyncio event loop.
Commands go through a sender thread, so the event loop never blocks on a full pipe
(which could deadlock against a child blocked on sending its outputs); outputs are
read on the event loop itself (``loop.add_reader``). The child ending for any reason
(an exception in ``step``, SIGKILL) closes its end of the pipe; the parent reads
EOF and reports the engine dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.core import EngineCore, EngineStats
from lmfleet.engine.outputs import EngineCoreOutput
from lmfleet.engine.request import FinishReason, Request
from lmfleet.errors import EngineDead, RequestRejected

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ---- parent → child: tagged tuples ``(kind, payload)`` -------------------------------
ADD = "add"  # payload: Request
ABORT = "abort"  # payload: list[str]
ABORT_ALL = "abort_all"  # payload: FinishReason
CALL = "call"  # payload: (call_id, fn); fn must pickle (a module-level function)
SHUTDOWN = "shutdown"  # payload: None

Command = tuple[str, Any]

#: how long the child sleeps between polls while its requests wait for wake
_ASLEEP_POLL_S = 0.5
#: how long shutdown waits for the child to exit before killing it
SHUTDOWN_TIMEOUT_S = 5.0


# ---- child → parent: one message per step --------------------------------------------
@dataclass(frozen=True, slots=True)
class CoreReady:
    """The model loaded; what the parent needs to serve without a core of its own."""

    model_dir: str
    eos_token_ids: frozenset[int]
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
    rejected: list[tuple[str, RequestRejected]] = field(default_factory=list)
    calls: list[CallResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Crashed:
    error: str  # repr of the exception: it may not pickle


# ---- the child -------------------------------------------------------------------------
def run_core(
    config: EngineConfig, progress: bool, commands: Connection, results: Connection
) -> None:
    """The child's entry point. Ctrl-C and SIGTERM are the parent's to handle (it
    drains first); the child ends on SHUTDOWN, on EOF from the parent, or by kill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        core = EngineCore(config, progress=progress)
    except BaseException as exc:  # the parent re-raises it
        results.send(LoadFailed(_picklable_error(exc)))
        return
    results.send(CoreReady(str(core.model_dir), core.eos_token_ids, core.stats()))
    try:
        _loop(core, commands, results)
    except (EOFError, BrokenPipeError):
        return  # the parent went away
    except BaseException as exc:  # the loop must report, never vanish
        logger.exception("engine core process crashed")
        with contextlib.suppress(OSError):
            results.send(Crashed(repr(exc)))
        raise SystemExit(1) from None


@dataclass(slots=True)
class _Pending:
    """What one round of the child's loop gathers for its :class:`StepResult`."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    rejected: list[tuple[str, RequestRejected]] = field(default_factory=list)
    calls: list[CallResult] = field(default_factory=list)


def _loop(core: EngineCore, commands: Connection, results: Connection) -> None:
    last_stats: EngineStats | None = None
    while True:
        if not core.has_unfinished():
            timeout: float | None = None  # idle: block until a command comes
        elif core.asleep:
            timeout = _ASLEEP_POLL_S  # step() would return nothing until wake
        else:
            timeout = 0.0
        pending = _Pending()
        if timeout is None or commands.poll(timeout):
            if not _apply(core, commands.recv(), pending):
                return
            while commands.poll():  # everything that queued up meanwhile
                if not _apply(core, commands.recv(), pending):
                    return
        if core.has_unfinished() and not core.asleep:
            pending.outputs.extend(core.step())
        stats = core.stats()
        if pending.outputs or pending.rejected or pending.calls or stats != last_stats:
            results.send(StepResult(stats, pending.outputs, pending.rejected, pending.calls))
            last_stats = stats


def _apply(core: EngineCore, batch: list[Command], pending: _Pending) -> bool:
    """Apply one batch of commands; False on SHUTDOWN."""
    for kind, payload in batch:
        if kind == ADD:
            try:
                core.add_request(payload)
            except RequestRejected as exc:
                pending.rejected.append((payload.request_id, exc))
        elif kind == ABORT:
            core.abort(payload)
        elif kind == ABORT_ALL:
            pending.outputs.extend(core.abort(list(core.scheduler.requests), payload))
        elif kind == CALL:
            call_id, fn = payload
            pending.calls.append(_run_call(core, call_id, fn))
        elif kind == SHUTDOWN:
            return False
        else:
            raise ValueError(f"unknown engine command {kind!r}")
    return True


def _run_call(core: EngineCore, call_id: int, fn: Callable[[EngineCore], Any]) -> CallResult:
    try:
        value = fn(core)
    except Exception as exc:
        return CallResult(call_id, error=_picklable_error(exc))
    try:
        pickle.dumps(value)
    except Exception as exc:
        err = TypeError(f"the result of {fn!r} cannot be sent back from the core: {exc}")
        return CallResult(call_id, error=err)
    return CallResult(call_id, value)


def _picklable_error(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


# ---- the parent ------------------------------------------------------------------------
class CoreProcessClient:
    """Runs ``EngineCore`` in a child process; used by ``AsyncEngine`` from one event
    loop. Callbacks run on that loop: ``on_step`` for each :class:`StepResult` (call
    results already resolved), ``on_dead`` once if the child ends unexpectedly."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        progress: bool,
        on_step: Callable[[StepResult], None],
        on_dead: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self._progress = progress
        self._on_step = on_step
        self._on_dead = on_dead
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None  # parent's sending end
        self._results: Connection | None = None  # parent's receiving end
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._closed = False
        self.dead: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self.dead is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> CoreReady:
        """Spawn the child and wait (off the event loop) until it loaded the model.
        A load error (``ModelLoadError`` ...) is re-raised here."""
        self._loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        res_recv, res_send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=run_core,
            args=(self.config, self._progress, cmd_recv, res_send),
            name="lmfleet-engine-core",
            daemon=True,
        )
        proc.start()
        cmd_recv.close()  # only the child holds these now, so its exit reads as EOF
        res_send.close()
        self._proc, self._commands, self._results = proc, cmd_send, res_recv
        try:
            first = await asyncio.to_thread(res_recv.recv)
        except (EOFError, OSError):
            await asyncio.to_thread(proc.join, SHUTDOWN_TIMEOUT_S)
            self._close_pipes()
            raise EngineDead(
                f"the engine core process exited while loading (exit code {proc.exitcode})"
            ) from None
        if isinstance(first, LoadFailed):
            await asyncio.to_thread(proc.join, SHUTDOWN_TIMEOUT_S)
            self._close_pipes()
            raise first.error
        if not isinstance(first, CoreReady):
            await self.shutdown()
            raise EngineDead(f"unexpected first message from the engine core: {first!r}")
        self._sender = threading.Thread(
            target=self._send_loop, name="lmfleet-core-sender", daemon=True
        )
        self._sender.start()
        self._loop.add_reader(res_recv.fileno(), self._on_readable)
        return first

    # ---- commands ----------------------------------------------------------------------
    def send(self, kind: str, payload: Any) -> None:
        if not self._closed and self.dead is None:
            self._outbox.put((kind, payload))

    def add_request(self, request: Request) -> None:
        self.send(ADD, request)

    def abort(self, request_ids: list[str]) -> None:
        self.send(ABORT, request_ids)

    def abort_all(self, reason: FinishReason) -> None:
        self.send(ABORT_ALL, reason)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run ``fn(core)`` in the child between two steps; ``fn`` must pickle (a
        module-level function). Raises what ``fn`` raised, or ``EngineDead``."""
        if self.dead is not None or self._closed or self._loop is None:
            raise EngineDead(f"the engine core process is not running: {self.dead!r}")
        try:
            pickle.dumps(fn)
        except Exception as exc:
            raise TypeError(
                f"{fn!r} cannot be sent to the engine core process ({exc}); "
                "pass a module-level function"
            ) from None
        call_id = next(self._call_ids)
        fut: asyncio.Future[T] = self._loop.create_future()
        self._calls[call_id] = fut
        self.send(CALL, (call_id, fn))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    def _send_loop(self) -> None:
        conn = self._commands
        if conn is None:
            return
        while True:
            item = self._outbox.get()
            batch: list[Command] = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._outbox.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    conn.send(batch)
                except (OSError, ValueError):
                    return  # the child is gone: the reader reports it
                except Exception:
                    logger.exception("cannot send %d commands to the engine core", len(batch))
            if item is None:
                return

    # ---- results -----------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._results
        if conn is None:
            return
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, StepResult):
                    self._handle_step(msg)
                elif isinstance(msg, Crashed):
                    self._died(EngineDead(f"the engine core process crashed: {msg.error}"))
                    return
                else:
                    logger.error("unexpected message from the engine core: %r", msg)
        except (EOFError, OSError):
            code = None
            if self._proc is not None:
                self._proc.join(0.2)  # it is exiting: reap it for its exit code
                code = self._proc.exitcode
            self._died(EngineDead(f"the engine core process exited (exit code {code})"))

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
        self._stop_reading()
        self._fail_calls(exc)
        self._outbox.put(None)  # let the sender thread end
        self._on_dead(exc)

    def _fail_calls(self, exc: BaseException) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(exc)
        self._calls.clear()

    def _stop_reading(self) -> None:
        if self._loop is not None and self._results is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._results.fileno())

    # ---- shutdown ----------------------------------------------------------------------
    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Ask the child to stop, wait up to ``timeout``, then kill it. Never hangs."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._fail_calls(EngineDead("the engine was shut down"))
        self._outbox.put((SHUTDOWN, None))
        self._outbox.put(None)
        proc = self._proc
        if proc is not None:
            await asyncio.to_thread(proc.join, timeout)
            if proc.is_alive():
                logger.warning("engine core process did not stop in %.1f s: killing it", timeout)
                proc.kill()
                await asyncio.to_thread(proc.join, timeout)
        if self._sender is not None:
            await asyncio.to_thread(self._sender.join, timeout)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for conn in (self._commands, self._results):
            if conn is not None:
                conn.close()
        self._commands = self._results = None
