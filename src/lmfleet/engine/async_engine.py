"""The one bridge between the engine and asyncio.

The engine core loops in a background thread. Requests go in through a thread-safe
inbox; each step's outputs come back to the event loop, where the output processor
turns them into text deltas and puts them on one asyncio queue per request.
Cancelling a consumer (a client that disconnects) aborts its request and frees its
KV blocks at the next step.

The narrow client interface (``start``, ``generate``, ``abort``, ``stats``, ``call``,
``shutdown``) is all the server uses. With ``engine_process=True`` the core runs in
its own process instead (see :mod:`lmfleet.engine.core_process`) behind the same
interface: the tokenizer and the output processor stay here, only token ids and
``EngineCoreOutput``s cross the process boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.core import EngineCore, EngineStats
from lmfleet.engine.core_process import (
    ABORT,
    ABORT_ALL,
    ADD,
    CALL,
    CoreProcessClient,
    StepResult,
)
from lmfleet.engine.output_processor import OutputProcessor
from lmfleet.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from lmfleet.engine.runner import ModelRunner, bind_device
from lmfleet.engine.tokenizer import Tokenizer, load_tokenizer
from lmfleet.errors import DuplicateRequestId, EngineDead, RequestRejected

logger = logging.getLogger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.5


class AsyncEngine:
    def __init__(
        self, config: EngineConfig, *, progress: bool = True, engine_process: bool = False
    ) -> None:
        self.config = config
        self._progress = progress
        self.engine_process = engine_process
        #: the core, in thread mode; None when it runs in its own process
        self.core: EngineCore | None = None
        self._client: CoreProcessClient | None = None
        self._eos_token_ids: frozenset[int] = frozenset()
        self.tokenizer: Tokenizer | None = None
        self._processor: OutputProcessor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._stats: EngineStats | None = None

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (in a worker thread or the core process, so the event loop
        keeps serving health checks) and start the engine loop."""
        self._loop = asyncio.get_running_loop()
        if self.engine_process:
            await self._start_process()
            return
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="lmfleet-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        self.core = EngineCore(self.config, progress=self._progress)
        self.tokenizer = load_tokenizer(self.core.model_dir)
        self._processor = OutputProcessor(self.tokenizer)
        self._eos_token_ids = self.core.eos_token_ids
        self._stats = self.core.stats()

    async def _start_process(self) -> None:
        client = CoreProcessClient(
            self.config, progress=self._progress, on_step=self._on_step, on_dead=self._on_dead
        )
        self._client = client
        ready = await client.start()  # re-raises the child's load error
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, ready.model_dir)
        except BaseException:
            await client.shutdown()
            raise
        self._processor = OutputProcessor(self.tokenizer)
        self._eos_token_ids = ready.eos_token_ids
        self._stats = ready.stats

    @property
    def ready(self) -> bool:
        if self._client is not None:
            return self._client.alive and self._processor is not None and self._dead is None
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._client is not None:
            await self._client.shutdown()
            self._fail_all(EngineDead("the engine was shut down"), prefix=False)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

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
        subclass before the first output if the request cannot be served."""
        processor = self._require_running()
        rid = request_id or self.new_request_id()
        if rid in self._queues:
            raise DuplicateRequestId(f"request id {rid!r} is already in flight")
        token_ids = self.encode(prompt)
        now = time.monotonic()
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self._eos_token_ids
        request = Request(
            rid, token_ids, params, eos_token_ids=eos, priority=priority, arrival_time=now
        )
        if self.core is not None:
            self.core.validate(request)  # reads only immutable limits: safe from this thread
        # (in process mode the core validates on arrival; a rejection comes back on the
        # request's queue and is raised below, still before the first output)
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

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run ``fn(core)`` on the engine thread between two steps. In process mode
        ``fn`` runs in the core process, so it must pickle (a module-level function)
        and so must its result; an engine that dies meanwhile raises ``EngineDead``."""
        if self._client is not None:
            if self._dead is not None:
                raise EngineDead(f"the engine loop stopped: {self._dead!r}")
            return await self._client.call(fn)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send(CALL, (fn, fut))
        return await asyncio.wrap_future(fut)

    # ---- plumbing ------------------------------------------------------------------
    def _require_running(self) -> OutputProcessor:
        if self._dead is not None:
            raise EngineDead(f"the engine loop stopped: {self._dead!r}")
        started = self._client is not None or (self.core is not None and self._thread is not None)
        if self._processor is None or not started:
            raise EngineDead("the engine is not started")
        return self._processor

    def _send(self, kind: str, payload: Any) -> None:
        if self._client is not None:
            self._client.send(kind, payload)  # the same command kinds
            return
        self._inbox.put((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        core = self.core
        if core is None:  # _load runs before the thread starts
            raise EngineDead("engine loop started before the model was loaded")
        if isinstance(core.runner, ModelRunner):  # loaded on another thread
            bind_device(core.runner.device)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_inbox(core)
                if not core.has_unfinished():
                    self._stats = core.stats()
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                outputs = core.step()
                self._stats = core.stats()
                if outputs:
                    self._post(self._dispatch, outputs)
        except BaseException as exc:  # the loop must report, never vanish
            logger.exception("engine loop crashed")
            self._dead = exc
            self._post(self._fail_all, exc)

    def _drain_inbox(self, core: EngineCore) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == ADD:
                try:
                    core.add_request(payload)
                except RequestRejected as exc:
                    self._post(self._fail_one, payload.request_id, exc)
            elif kind == ABORT:
                core.abort(payload)
            elif kind == ABORT_ALL:
                outputs = core.abort(list(core.scheduler.requests), payload)
                self._post(self._dispatch, outputs)
            elif kind == CALL:
                fn, fut = payload
                try:
                    fut.set_result(fn(core))
                except Exception as exc:
                    fut.set_exception(exc)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _dispatch(self, outputs: list) -> None:
        processor = self._processor
        if processor is None:
            return
        processed = processor.process(outputs)
        if processed.to_abort:
            self._send(ABORT, processed.to_abort)
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

    def _fail_all(self, exc: BaseException, *, prefix: bool = True) -> None:
        dead = EngineDead(f"the engine loop stopped: {exc!r}") if prefix else exc
        for q in self._queues.values():
            q.put_nowait(dead)
        self._queues.clear()

    # ---- process mode: called on the event loop by the CoreProcessClient ----------------
    def _on_step(self, msg: StepResult) -> None:
        self._stats = msg.stats
        for request_id, exc in msg.rejected:
            self._fail_one(request_id, exc)
        if msg.outputs:
            self._dispatch(msg.outputs)

    def _on_dead(self, exc: BaseException) -> None:
        self._dead = exc
        self._fail_all(exc)
