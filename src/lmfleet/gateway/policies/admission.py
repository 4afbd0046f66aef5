"""The admission queue of one (model, version): may a request enter now, wait, or not.

Boundary: counts slots (the sum of the eligible replicas' concurrency caps, set by
the caller) and orders waiters; it knows nothing of HTTP or replicas. Its depth is
the queue-depth metric the autoscaler scales on. Its own timers run on the asyncio
loop; the injected clock stamps arrivals (wait times, ``oldest_wait_s``) and paces
the Retry-After estimate.

Rules:

- A request enters at once when a slot is free and nobody waits (waiters always go
  first: a free slot is handed to the best waiter as soon as it frees).
- Otherwise it waits, best first: higher ``priority`` first, FIFO within a priority.
- At most ``max_queue`` wait. A request arriving at a full queue evicts the waiter
  with the lowest negative priority if that priority is below its own (the newest
  such waiter; it is rejected with reason ``"shed"``); otherwise the arrival is
  rejected with ``"queue_full"``.
- Negative priority means sheddable. A sheddable arrival is rejected at once with
  ``"shed"`` when the version is *saturated*: every slot is busy and at least
  ``shed_backlog`` requests already wait (default 1), or the queue is full. So by
  default sheddable traffic takes spare capacity and may be first in line, but never
  joins a backlog; a larger ``shed_backlog`` lets it queue (evictable) up to there.
- A waiter not admitted within ``max_wait_s`` is rejected with ``"timeout"``.
- With capacity 0 (no replica ready yet) requests wait, up to ``max_wait_s``.

Cancellation-safe: a waiter cancelled while queued leaves the queue; one cancelled
in the instant between being admitted and resuming gives its slot back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from lmfleet.errors import QueueFull

RejectReason = Literal["queue_full", "timeout", "shed"]

#: weight of the newest inter-release gap in the Retry-After estimate
_EWMA_ALPHA = 0.2
#: Retry-After is clamped to [_MIN_RETRY_S, _MAX_RETRY_S]
_MIN_RETRY_S = 1.0
_MAX_RETRY_S = 60.0


class QueueRejected(QueueFull):
    """The admission queue turned a request away. Recoverable: retry after
    ``retry_after_s`` (HTTP 429/503 with Retry-After)."""

    def __init__(self, reason: RejectReason, retry_after_s: float, detail: str = "") -> None:
        message = f"request rejected by the admission queue ({reason})"
        if detail:
            message += f": {detail}"
        super().__init__(f"{message}; retry after {retry_after_s:.0f} s")
        self.reason: RejectReason = reason
        self.retry_after_s = retry_after_s


@dataclass(slots=True, eq=False)
class _Waiter:
    priority: int
    enqueued_at: float
    future: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = field(default=None)


class AdmissionQueue:
    """Slots and a priority queue for one (model, version)."""

    def __init__(
        self,
        max_queue: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        shed_backlog: int = 1,
    ) -> None:
        if max_queue < 0 or not max_wait_s >= 0 or shed_backlog < 1:
            raise ValueError(
                "need max_queue >= 0, max_wait_s >= 0 and shed_backlog >= 1, got "
                f"{max_queue}, {max_wait_s}, {shed_backlog}"
            )
        self.max_queue = max_queue
        self.shed_backlog = shed_backlog
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._capacity = 0
        self._inflight = 0
        self._depth = 0
        self._by_priority: dict[int, deque[_Waiter]] = {}
        self._last_release: float | None = None
        self._release_gap_s: float | None = None  # EWMA of the time between releases
        self.admitted_total = 0
        self.rejected_total: dict[str, int] = {"queue_full": 0, "timeout": 0, "shed": 0}

    # -- state ---------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting (not yet admitted)."""
        return self._depth

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet released."""
        return self._inflight

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def saturated(self) -> bool:
        """Every slot busy and ``shed_backlog`` requests waiting, or the queue full."""
        return self._inflight >= self._capacity and (
            self._depth >= self.shed_backlog or self._depth >= self.max_queue
        )

    def oldest_wait_s(self, now: float | None = None) -> float:
        """How long the longest waiter has waited (0 when nobody waits)."""
        if now is None:
            now = self._clock()
        oldest = min((q[0].enqueued_at for q in self._by_priority.values() if q), default=None)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def retry_after_s(self) -> float:
        """A Retry-After hint: the time for the backlog ahead to drain, clamped to
        [1, 60] s; ``max_wait_s`` (at least 1 s) before any release was seen."""
        if self._release_gap_s is None or self._capacity == 0:
            return min(max(self.max_wait_s, _MIN_RETRY_S), _MAX_RETRY_S)
        estimate = (self._depth + 1) * self._release_gap_s
        return min(max(estimate, _MIN_RETRY_S), _MAX_RETRY_S)

    # -- admission -----------------------------------------------------------------

    def try_admit(self) -> bool:
        """Take a slot now if one is free and nobody waits; never waits."""
        if self._depth == 0 and self._inflight < self._capacity:
            self._inflight += 1
            self.admitted_total += 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        """Return once admitted (the caller then owes one :meth:`release`).

        Raises :class:`QueueRejected` with reason ``queue_full``, ``timeout`` or
        ``shed``; see the module docstring for when.
        """
        if self.try_admit():
            return
        if priority < 0 and self.saturated:
            raise self._reject("shed", "sheddable request while the version is saturated")
        if self._depth >= self.max_queue:
            victim = self._lowest_sheddable_below(priority)
            if victim is None:
                raise self._reject("queue_full", f"{self._depth} requests already waiting")
            self._drop(victim)
            if not victim.future.done():  # a cancelled victim just leaves
                victim.future.set_exception(
                    self._reject("shed", "evicted from a full queue by a higher-priority request")
                )
        waiter = self._enqueue(priority)
        try:
            await waiter.future
        except asyncio.CancelledError:
            self._on_cancelled(waiter)
            raise

    def release(self) -> None:
        """One admitted request finished: its slot goes to the best waiter."""
        if self._inflight <= 0:
            raise RuntimeError("AdmissionQueue.release() without a matching admission")
        self._inflight -= 1
        self._note_release()
        self._admit_waiters()

    def set_capacity(self, n: int) -> None:
        """Total slots: the sum of the eligible replicas' caps (0 while none is ready).

        Lowering it below the in-flight count evicts nobody; new requests wait.
        """
        if n < 0:
            raise ValueError(f"capacity must be >= 0, got {n}")
        self._capacity = n
        self._admit_waiters()

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        """``async with queue.slot(priority):`` acquire, and release on the way out."""
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    # -- internals -----------------------------------------------------------------

    def _enqueue(self, priority: int) -> _Waiter:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, self._clock(), loop.create_future())
        self._by_priority.setdefault(priority, deque()).append(waiter)
        self._depth += 1
        if math.isfinite(self.max_wait_s):
            waiter.timer = loop.call_later(self.max_wait_s, self._on_timeout, waiter)
        return waiter

    def _drop(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of the queue; False if it was not queued."""
        queue = self._by_priority.get(waiter.priority)
        if queue is None:
            return False
        try:
            queue.remove(waiter)
        except ValueError:
            return False
        if not queue:
            del self._by_priority[waiter.priority]
        self._depth -= 1
        if waiter.timer is not None:
            waiter.timer.cancel()
        return True

    def _pop_best(self) -> _Waiter | None:
        if not self._by_priority:
            return None
        top = max(self._by_priority)
        queue = self._by_priority[top]
        waiter = queue.popleft()
        if not queue:
            del self._by_priority[top]
        self._depth -= 1
        if waiter.timer is not None:
            waiter.timer.cancel()
        return waiter

    def _lowest_sheddable_below(self, priority: int) -> _Waiter | None:
        if not self._by_priority:
            return None
        lowest = min(self._by_priority)
        if lowest >= 0 or lowest >= priority:
            return None
        return self._by_priority[lowest][-1]  # newest of the lowest: it has waited least

    def _admit_waiters(self) -> None:
        while self._inflight < self._capacity:
            waiter = self._pop_best()
            if waiter is None:
                return
            if waiter.future.done():  # cancelled, its task not yet resumed
                continue
            self._inflight += 1
            self.admitted_total += 1
            waiter.future.set_result(None)

    def _on_timeout(self, waiter: _Waiter) -> None:
        if self._drop(waiter) and not waiter.future.done():
            waiter.future.set_exception(
                self._reject("timeout", f"not admitted within {self.max_wait_s:g} s")
            )

    def _on_cancelled(self, waiter: _Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release()  # admitted, then cancelled before it could run: give it back
        else:
            self._drop(waiter)

    def _reject(self, reason: RejectReason, detail: str) -> QueueRejected:
        self.rejected_total[reason] += 1
        return QueueRejected(reason, self.retry_after_s(), detail)

    def _note_release(self) -> None:
        now = self._clock()
        if self._last_release is not None:
            gap = max(0.0, now - self._last_release)
            prev = self._release_gap_s
            self._release_gap_s = gap if prev is None else prev + _EWMA_ALPHA * (gap - prev)
        self._last_release = now
