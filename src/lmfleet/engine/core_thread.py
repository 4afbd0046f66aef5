"""The engine core in a background thread of the server's process (the default).

The model loads in a worker thread (the event loop keeps answering health checks),
then one thread, ``lmfleet-engine``, runs :func:`~lmfleet.engine.core_commands.serve_core`
over a queue of commands and posts each :class:`StepResult` to the event loop. The
same loop and command handler run in the core process
(:mod:`lmfleet.engine.core_process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.core import EngineCore
from lmfleet.engine.core_commands import (
    SHUTDOWN,
    Command,
    CoreLink,
    CoreReady,
    StepResult,
    serve_core,
)
from lmfleet.errors import EngineDead

logger = logging.getLogger(__name__)

THREAD_NAME = "lmfleet-engine"


class _QueueInbox:
    """Commands from the event loop to the engine thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def take(self, timeout: float | None) -> list[Command] | None:
        try:
            first = self._queue.get(block=timeout != 0, timeout=timeout or None)
        except queue.Empty:
            return None
        batch = [first]
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch


class ThreadCore(CoreLink):
    """Runs ``EngineCore`` on a background thread; used by ``AsyncEngine`` from one
    event loop (callbacks run on that loop)."""

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
        self._inbox = _QueueInbox()
        self._thread: threading.Thread | None = None
        #: the core itself, for tests and tools in this process (the server never uses it)
        self.core: EngineCore | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    async def start(self) -> CoreReady:
        """Load the model off the event loop, then start the engine thread. A load
        error is raised here."""
        self._loop = asyncio.get_running_loop()
        core = await asyncio.to_thread(EngineCore, self.config, progress=self._progress)
        self.core = core
        ready = CoreReady(core.info(), core.stats())
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        return ready

    def send(self, kind: str, payload: Any) -> None:
        if not self._closed and self.dead is None:
            self._inbox.put((kind, payload))

    def _run(self) -> None:
        core = self.core
        if core is None:  # start() loads it before the thread starts
            raise EngineDead("engine loop started before the model was loaded")
        try:
            serve_core(core, self._inbox, self._post_step)
        except BaseException as exc:  # the loop must report, never vanish
            logger.exception("engine loop crashed")
            self._post(self._died, EngineDead(f"the engine loop stopped: {exc!r}"))

    def _post_step(self, msg: StepResult) -> None:
        self._post(self._handle_step, msg)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody listens
                loop.call_soon_threadsafe(fn, *args)

    async def shutdown(self) -> None:
        """Stop the engine thread after its current step."""
        if self._closed:
            return
        self._inbox.put((SHUTDOWN, None))
        self._closed = True
        self._fail_calls(EngineDead("the engine was shut down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
