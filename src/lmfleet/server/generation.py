"""One API request's generation: ``n`` (× prompts) engine requests run side by side.

:class:`Generation` fans a request out into one engine request per choice (distinct
request ids, seeds ``seed + i``), merges their delta outputs into one stream of
``(choice, output)`` events, keeps each choice's text, tokens and logprobs, and
reports finished requests to the metrics. :meth:`Generation.close` is synchronous
and idempotent: it cancels the per-choice tasks (which aborts their engine requests
and frees their KV blocks) and releases the admission ticket, so it can run from
any ``finally`` — also one inside a cancelled scope, where nothing may be awaited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from lmfleet.engine.async_engine import AsyncEngine
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
        engine: AsyncEngine,
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
        self._tasks = [
            asyncio.get_running_loop().create_task(self._pump(i, job, priority))
            for i, job in enumerate(jobs)
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
                self._metrics.observe_token_gap(now - choice.last_token_at)
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

    def close(self) -> None:
        """Abort what is unfinished and release the admission ticket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            if not choice.done and choice.last is not None:
                aborted = dataclasses.replace(
                    choice.last, finished=True, finish_reason=FinishReason.ABORT
                )
                self._metrics.record_finished(
                    aborted, len(choice.job.prompt_ids), len(choice.token_ids)
                )
        self._ticket.release()

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
