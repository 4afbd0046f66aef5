"""The engine core in its own process (opt-in), the way vLLM V1 runs it.

The child (a ``spawn`` process) builds ``EngineCore(config)`` and runs the loop the
thread mode runs too (:func:`~lmfleet.engine.core_commands.serve_core`): take
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
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.core import EngineCore
from lmfleet.engine.core_commands import (
    SHUTDOWN,
    Command,
    CoreLink,
    CoreReady,
    Crashed,
    LoadFailed,
    StepResult,
    picklable_error,
    serve_core,
)
from lmfleet.errors import EngineDead

logger = logging.getLogger(__name__)

#: how long shutdown waits for the child to exit before killing it
SHUTDOWN_TIMEOUT_S = 5.0


# ---- the child -------------------------------------------------------------------------
class _PipeInbox:
    """Batches of commands from the parent's pipe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def take(self, timeout: float | None) -> list[Command] | None:
        if not self._conn.poll(timeout):
            return None
        batch: list[Command] = self._conn.recv()
        while self._conn.poll():  # everything that queued up meanwhile
            batch += self._conn.recv()
        return batch


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
        results.send(LoadFailed(picklable_error(exc)))
        return
    results.send(CoreReady(core.info(), core.stats()))
    try:
        serve_core(core, _PipeInbox(commands), results.send)
    except (EOFError, BrokenPipeError):
        return  # the parent went away
    except BaseException as exc:  # the loop must report, never vanish
        logger.exception("engine core process crashed")
        with contextlib.suppress(OSError):
            results.send(Crashed(repr(exc)))
        raise SystemExit(1) from None


# ---- the parent ------------------------------------------------------------------------
class CoreProcessClient(CoreLink):
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
        super().__init__(on_step=on_step, on_dead=on_dead)
        self.config = config
        self._progress = progress
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None  # parent's sending end
        self._results: Connection | None = None  # parent's receiving end
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

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

    def _died(self, exc: BaseException) -> None:
        if self.dead is None:
            self._stop_reading()
            self._outbox.put(None)  # let the sender thread end
        super()._died(exc)

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
