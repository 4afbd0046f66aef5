"""One API request's generation: ``n`` (× prompts) engine requests run side by side.

:class:`Generation` fans a request out into one engine request per choice (distinct
request ids, seeds ``seed + i`` wrapped into 64 bits), merges their delta outputs into one stream of
``(choice, output)`` events, keeps each choice's text, tokens and logprobs, and
reports finished requests to the metrics. A single choice (the common case) reads
the engine's stream directly, in the consumer's task; several are pumped by one
task each into a shared queue. :meth:`Generation.close` is synchronous and
idempotent: it aborts the unfinished engine requests (freeing their KV blocks at
the engine's next step) and releases the admission ticket, so it can run from any
``finally`` — also one inside a cancelled scope, where nothing may be awaited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from lmfleet.engine.client import EngineClient
from lmfleet.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprobs
from lmfleet.server.metrics import ReplicaMetrics
from lmfleet.server.replica import Ticket

T = TypeVar("T")


@dataclass(slots=True)
class Job:
    index: int  # the choice index in the response
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass(slots=True)
class Choice:
    job: Job
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    last: RequestOutput | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # observed when the choice ends

    @property
    def index(self) -> int:
        return self.job.index

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


class Generation:
    def __init__(
        self,
        engine: EngineClient,
        jobs: list[Job],
        ticket: Ticket,
        metrics: ReplicaMetrics,
        *,
        priority: int = 0,
    ) -> None:
        self.choices = [Choice(job) for job in jobs]
        self._engine = engine
        self._ticket = ticket
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
        self._pending = len(jobs)
        self._closed = False
        self._single: AsyncGenerator[RequestOutput, None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if len(jobs) == 1:  # no task, no queue hop: the consumer iterates the engine
            job = jobs[0]
            self._single = engine.generate(
                job.prompt_ids, job.params, request_id=job.request_id, priority=priority
            )
        else:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._pump(i, job, priority)) for i, job in enumerate(jobs)
            ]

    async def _pump(self, slot: int, job: Job, priority: int) -> None:
        gen = self._engine.generate(
            job.prompt_ids, job.params, request_id=job.request_id, priority=priority
        )
        try:
            async with aclosing(gen) as outputs:
                async for out in outputs:
                    self._queue.put_nowait((slot, out))
        except Exception as exc:  # reported to the consumer, who decides
            self._queue.put_nowait((slot, exc))

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each delta output with its choice (already updated), until all finish.
        Raises the first error of any choice."""
        if self._single is not None:
            choice = self.choices[0]
            async with aclosing(self._single) as outputs:
                async for out in outputs:
                    self._absorb(choice, out)
                    yield choice, out
            return
        while self._pending:
            slot, item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            choice = self.choices[slot]
            self._absorb(choice, item)
            yield choice, item

    async def run_to_end(self) -> None:
        async for _ in self.events():
            pass

    def _absorb(self, choice: Choice, out: RequestOutput) -> None:
        if out.token_ids:
            now = time.monotonic()
            if choice.last_token_at is not None:
                choice.token_gaps.append(now - choice.last_token_at)
            choice.last_token_at = now
        choice.text.append(out.text)
        choice.token_ids.extend(out.token_ids)
        if out.logprobs:
            choice.logprobs.extend(out.logprobs)
        choice.num_cached_tokens = max(choice.num_cached_tokens, out.num_cached_tokens)
        choice.last = out
        if out.finished:
            choice.finish_reason = out.finish_reason or FinishReason.STOP
            choice.stop_reason = out.stop_reason
            self._pending -= 1
            self._metrics.record_finished(out, len(choice.job.prompt_ids), len(choice.token_ids))
            self._flush_gaps(choice)

    def _flush_gaps(self, choice: Choice) -> None:
        if choice.token_gaps:
            self._metrics.observe_token_gaps(choice.token_gaps)
            choice.token_gaps = []

    def close(self) -> None:
        """Abort what is unfinished and release the admission ticket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()  # aborts the engine request in the generator's finally
        for choice in self.choices:
            if choice.done:
                continue
            if self._single is not None:  # its generator may never resume: abort here
                self._engine.abort(choice.job.request_id)
            if choice.last is not None:
                aborted = dataclasses.replace(
                    choice.last, finished=True, finish_reason=FinishReason.ABORT
                )
                self._metrics.record_finished(
                    aborted, len(choice.job.prompt_ids), len(choice.token_ids)
                )
            self._flush_gaps(choice)
        self._ticket.release()

    @property
    def done(self) -> bool:
        """Every choice has finished."""
        return self._pending == 0

    # ---- totals -------------------------------------------------------------------------
    def prompt_tokens(self) -> int:
        """Each prompt counted once, however many choices it has (as OpenAI counts)."""
        seen: dict[int, int] = {}
        for c in self.choices:
            seen.setdefault(c.job.prompt_index, len(c.job.prompt_ids))
        return sum(seen.values())

    def cached_tokens(self) -> int:
        seen: dict[int, int] = {}
        for c in self.choices:
            seen[c.job.prompt_index] = max(seen.get(c.job.prompt_index, 0), c.num_cached_tokens)
        return sum(seen.values())

    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise
    ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def ready_batches(source: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """The items of ``source`` in batches: one that had to be waited for, then every
    item after it that was ready without waiting. A consumer that fell behind its
    producer (several token deltas queued) so writes them in one go.

    Readiness is read off the coroutine protocol: ``source``'s next step is run
    until it either returns (ready) or would wait on a future; in the latter case
    the batch so far is yielded first and the step resumed afterwards. If this
    generator is closed while a step is pending, the step gets ``GeneratorExit``
    (``source``'s ``finally`` blocks run, e.g. the engine request is aborted)."""
    batch: list[T] = []
    while True:
        step = source.__anext__().__await__()
        try:
            waiting = step.send(None)  # run the step until it returns or would wait
        except StopIteration as ready:
            batch.append(ready.value)
            continue
        except StopAsyncIteration:
            if batch:
                yield batch
            return
        if batch:
            try:
                yield batch
            except BaseException:
                _abandon(step)
                raise
            batch = []
        try:
            item = await _Resume(step, waiting)
        except StopAsyncIteration:
            return
        batch.append(item)


async def send_within(
    send: Callable[[Any], Awaitable[None]], message: Any, timeout_s: float
) -> bool:
    """``await send(message)``, False if it had to wait longer than ``timeout_s``
    (the client stopped reading). A send that completes without waiting, the
    common case, arms no timer: its first step is run here, as in :func:`ready_batches`."""
    step = send(message).__await__()
    try:
        waiting = step.send(None)
    except StopIteration:
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await _Resume(step, waiting)
    except TimeoutError:
        return False
    return True


def _abandon(step: Generator[Any, Any, Any]) -> None:
    with suppress(GeneratorExit, StopIteration, StopAsyncIteration):
        step.throw(GeneratorExit)


class _Resume:
    """Awaits the rest of a step begun outside a task: first the future it waits
    on, then whatever the step does next (a cancellation is passed into it)."""

    __slots__ = ("_step", "_waiting")

    def __init__(self, step: Generator[Any, Any, Any], waiting: Any) -> None:
        self._step = step
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        step, waiting = self._step, self._waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:
                try:
                    waiting = step.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting = step.send(sent)
                except StopIteration as done:
                    return done.value
