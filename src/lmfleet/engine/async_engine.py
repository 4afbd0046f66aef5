"""The one bridge between the engine and asyncio: the :class:`EngineClient` the
server uses.

The engine core runs behind a :class:`~lmfleet.engine.core_commands.CoreLink`: a
background thread (:mod:`~lmfleet.engine.core_thread`, the default) or its own
process (``engine_process=True``, :mod:`~lmfleet.engine.core_process`). Both serve
the same commands with the same loop. Requests go in as commands; each step's
outputs come back to the event loop, where the output processor turns them into
text deltas and puts them on one asyncio queue per request. The tokenizer and the
output processor stay here, so only token ids and ``EngineCoreOutput``s cross to
the core. Cancelling a consumer (a client that disconnects) aborts its request and
frees its KV blocks at the next step.

A request is checked against the engine's limits (:mod:`~lmfleet.engine.limits`) in
the caller's task, so a rejection is raised before anything is queued, in both
modes. A request that fails inside the engine raises ``RequestFailed`` from its
stream alone; a dead engine fails every stream with ``EngineDead`` and calls
:attr:`AsyncEngine.on_dead`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from lmfleet.engine.client import EngineHealth
from lmfleet.engine.config import EngineConfig
from lmfleet.engine.core_commands import (
    ABORT,
    ABORT_ALL,
    ADD,
    SLEEP,
    WAKE,
    CoreLink,
    CoreReady,
    StepResult,
)
from lmfleet.engine.faults import fault_injector
from lmfleet.engine.limits import check_request
from lmfleet.engine.output_processor import OutputProcessor
from lmfleet.engine.outputs import EngineCoreOutput, request_failed
from lmfleet.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from lmfleet.engine.stats import EngineInfo, EngineStats
from lmfleet.engine.tokenizer import Tokenizer, load_tokenizer
from lmfleet.errors import DuplicateRequestId, EngineDead, RequestRejected

logger = logging.getLogger(__name__)


class AsyncEngine:
    """:class:`~lmfleet.engine.client.EngineClient` over a core in a thread or a process."""

    def __init__(
        self, config: EngineConfig, *, progress: bool = True, engine_process: bool = False
    ) -> None:
        self.config = config
        self._progress = progress
        self.engine_process = engine_process
        self._link: CoreLink | None = None
        #: what the loaded engine reported (None until started)
        self.info: EngineInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self._processor: OutputProcessor | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._stats: EngineStats | None = None
        #: called once on the event loop when the engine dies (a step failed)
        self.on_dead: Callable[[BaseException], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (in a worker thread or the core process, so the event loop
        keeps serving health checks) and start the engine loop. A load error such as
        ``ModelLoadError`` is raised here."""
        link = self._new_link()
        self._link = link
        ready: CoreReady = await link.start()
        try:
            self.tokenizer = await asyncio.to_thread(
                load_tokenizer, ready.info.model_dir, self.config.model.tokenizer
            )
        except BaseException:
            await link.shutdown()
            raise
        faults = fault_injector(self.config.model.fault_injection)
        self._processor = OutputProcessor(self.tokenizer, faults)
        self._stats = ready.stats
        self.info = ready.info

    def _new_link(self) -> CoreLink:
        if self.engine_process:
            from lmfleet.engine.core_process import CoreProcessClient

            return CoreProcessClient(
                self.config, progress=self._progress, on_step=self._on_step, on_dead=self._on_dead
            )
        from lmfleet.engine.core_thread import ThreadCore

        return ThreadCore(
            self.config, progress=self._progress, on_step=self._on_step, on_dead=self._on_dead
        )

    @property
    def core(self):
        """The ``EngineCore`` in thread mode (for tests and tools in this process;
        the server never touches it); None in process mode or before start."""
        return getattr(self._link, "core", None)

    @property
    def ready(self) -> bool:
        link = self._link
        return link is not None and link.alive and self.info is not None and self._dead is None

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def health(self) -> EngineHealth:
        dead = self._dead
        return EngineHealth(
            started=self.info is not None, dead=dead is not None, error=str(dead) if dead else None
        )

    async def shutdown(self) -> None:
        link = self._link
        if link is not None:
            await link.shutdown()
        self._fail_all(EngineDead("the engine was shut down"))

    # ---- requests ------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this model has no tokenizer; send token ids", param="prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs as deltas. Raises a ``RequestRejected``
        subclass before the first output if the request cannot be served,
        ``RequestFailed`` if the engine failed on it alone, ``EngineDead`` if the
        engine died."""
        processor, info = self._require_running()
        rid = request_id or self.new_request_id()
        if rid in self._queues:
            raise DuplicateRequestId(f"request id {rid!r} is already in flight")
        token_ids = self.encode(prompt)
        now = time.monotonic()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else info.eos_token_ids
        request = Request(
            rid, token_ids, params, eos_token_ids=eos, priority=priority, arrival_time=now
        )
        check_request(request, info.limits)  # the core checks again on arrival
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        processor.add_request(
            rid,
            token_ids,
            params,
            arrival_time=now,
            delta=True,
            prompt=prompt if isinstance(prompt, str) else None,
        )
        self._send(ADD, request)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the engine's next step."""
        self._queues.pop(request_id, None)
        if self._processor is not None:
            self._processor.drop(request_id)
        self._send(ABORT, [request_id])

    def abort_all(self, reason: FinishReason = FinishReason.ABORT) -> None:
        """End every request in flight; streams end with ``reason``."""
        self._send(ABORT_ALL, reason)

    def stats(self) -> EngineStats | None:
        return self._stats

    async def sleep(self) -> float:
        """Weights to host memory, KV cache freed; only when idle (``EngineBusy``
        otherwise). Returns the seconds it took."""
        return await self._call(SLEEP)

    async def wake(self) -> float:
        """Undo :meth:`sleep`; returns the seconds it took."""
        return await self._call(WAKE)

    # ---- plumbing ------------------------------------------------------------------
    async def _call(self, kind: str) -> float:
        if self._dead is not None:
            raise EngineDead(f"the engine loop stopped: {self._dead}")
        if self._link is None:
            raise EngineDead("the engine is not started")
        return await self._link.call(kind)

    def _require_running(self) -> tuple[OutputProcessor, EngineInfo]:
        if self._dead is not None:
            raise EngineDead(str(self._dead))
        if self._processor is None or self.info is None or self._link is None:
            raise EngineDead("the engine is not started")
        return self._processor, self.info

    def _send(self, kind: str, payload: object) -> None:
        if self._link is not None:
            self._link.send(kind, payload)

    def _on_step(self, msg: StepResult) -> None:
        """On the event loop: one :class:`StepResult` from the core."""
        self._stats = msg.stats
        for request_id, exc in msg.rejected:
            self._fail_one(request_id, exc)
        if msg.outputs:
            self._dispatch(msg.outputs)

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        processor = self._processor
        if processor is None:
            return
        processed = processor.process(outputs)
        if processed.to_abort:
            self._send(ABORT, processed.to_abort)
        for request_id, error in processed.failed:
            self._fail_one(request_id, request_failed(request_id, error))
        for out in processed.outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            q.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]

    def _fail_one(self, request_id: str, exc: BaseException) -> None:
        if self._processor is not None:
            self._processor.drop(request_id)
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(exc)
        self._queues.clear()

    def _on_dead(self, exc: BaseException) -> None:
        """On the event loop, once: the core died. Fail every stream, tell the owner."""
        self._dead = exc
        self._fail_all(exc)
        if self.on_dead is not None:
            self.on_dead(exc)
