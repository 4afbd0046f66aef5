"""The admission queue: slots, priority order, shedding, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from lmfleet.errors import LmfleetError, QueueFull
from lmfleet.gateway.policies.admission import AdmissionQueue, QueueRejected


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def waiter(q: AdmissionQueue, label: str, order: list[str], priority: int = 0) -> None:
    await q.acquire(priority)
    order.append(label)


def make_queue(capacity: int = 1, max_queue: int = 10, max_wait_s: float = 30.0, **kw):
    q = AdmissionQueue(max_queue=max_queue, max_wait_s=max_wait_s, **kw)
    q.set_capacity(capacity)
    return q


def test_admits_at_once_while_slots_are_free():
    async def main():
        q = make_queue(capacity=2)
        await q.acquire()
        await q.acquire()
        assert (q.inflight, q.depth) == (2, 0)
        assert not q.try_admit()
        q.release()
        assert q.try_admit()
        assert q.admitted_total == 3

    run(main())


def test_waiters_go_by_priority_then_arrival():
    async def main():
        q = make_queue(capacity=1)
        await q.acquire()
        order: list[str] = []
        tasks = []
        for label, prio in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 1)]:
            tasks.append(asyncio.create_task(waiter(q, label, order, prio)))
            await settle()
        assert q.depth == 5
        assert not q.try_admit()  # a free slot would go to the waiters first
        for _ in tasks:
            q.release()
            await settle()
        await asyncio.gather(*tasks)
        assert order == ["high1", "high2", "mid", "low1", "low2"]

    run(main())


def test_full_queue_rejects_with_queue_full():
    async def main():
        q = make_queue(capacity=1, max_queue=2)
        await q.acquire()
        tasks = [asyncio.create_task(q.acquire()) for _ in range(2)]
        await settle()
        with pytest.raises(QueueRejected) as info:
            await q.acquire(priority=3)
        assert info.value.reason == "queue_full"
        assert 1.0 <= info.value.retry_after_s <= 60.0
        assert isinstance(info.value, QueueFull) and isinstance(info.value, LmfleetError)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert q.rejected_total["queue_full"] == 1

    run(main())


def test_a_higher_priority_arrival_evicts_the_lowest_sheddable_waiter():
    async def main():
        q = make_queue(capacity=1, max_queue=3)
        await q.acquire()
        order: list[str] = []
        shed_a = asyncio.create_task(waiter(q, "shed_a", order, -1))
        await settle()  # queue was empty: a sheddable request may be first in line
        normal = asyncio.create_task(waiter(q, "normal", order, 0))
        await settle()
        shed_b = asyncio.create_task(waiter(q, "shed_b", order, -2))
        await settle()
        assert shed_b.done()  # saturated (busy and a backlog): rejected at once
        assert shed_b.exception().reason == "shed"
        q.max_queue = 2  # the queue is now full: [shed_a, normal]
        first = asyncio.create_task(waiter(q, "first", order, 0))
        await settle()
        assert shed_a.done() and shed_a.exception().reason == "shed"
        # a full queue of non-sheddable waiters: nobody to evict
        with pytest.raises(QueueRejected, match="queue_full"):
            await q.acquire(priority=9)
        q.release()
        await settle()
        q.release()
        await settle()
        await asyncio.gather(normal, first)
        assert order == ["normal", "first"]
        assert q.rejected_total == {"queue_full": 1, "timeout": 0, "shed": 2}

    run(main())


def test_eviction_takes_the_newest_of_the_lowest_priority_and_only_below_the_arrival():
    async def main():
        q = make_queue(capacity=1, max_queue=3, shed_backlog=3)  # sheddables may queue
        await q.acquire()
        tasks = {}
        for label, prio in [("m3_old", -3), ("m1", -1), ("m3_new", -3)]:
            tasks[label] = asyncio.create_task(q.acquire(prio))
            await settle()
        assert q.depth == 3 and q.saturated
        # a sheddable arrival at a saturated queue is refused, even above the waiters
        with pytest.raises(QueueRejected, match="shed"):
            await q.acquire(-2)
        vip = asyncio.create_task(q.acquire(0))
        await settle()
        assert tasks["m3_new"].done() and tasks["m3_new"].exception().reason == "shed"
        assert not tasks["m3_old"].done() and not tasks["m1"].done()
        vip2 = asyncio.create_task(q.acquire(0))
        await settle()
        assert tasks["m3_old"].done() and tasks["m3_old"].exception().reason == "shed"
        q.release()
        await vip  # best first: the first vip, then the second, then -1
        assert [t.done() for t in (vip2, tasks["m1"])] == [False, False]
        for t in (tasks["m1"], vip2):
            t.cancel()
        await asyncio.gather(*tasks.values(), vip2, return_exceptions=True)
        assert (q.depth, q.inflight) == (0, 1)

    run(main())


def test_an_arrival_evicts_only_waiters_below_its_own_priority():
    async def main():
        q = make_queue(capacity=1, max_queue=1, shed_backlog=5)
        await q.acquire()
        waiting = asyncio.create_task(q.acquire(-1))
        await settle()
        with pytest.raises(QueueRejected, match="shed"):  # -1 arriving: saturated (full)
            await q.acquire(-1)
        assert not waiting.done()
        q.release()
        await waiting

    run(main())


def test_sheddable_requests_use_spare_capacity():
    async def main():
        q = make_queue(capacity=2)
        await q.acquire(priority=-1)
        await q.acquire(priority=-5)
        assert q.inflight == 2 and not q.saturated

    run(main())


def test_max_queue_zero_refuses_everything_without_a_slot():
    async def main():
        q = make_queue(capacity=1, max_queue=0)
        await q.acquire()
        with pytest.raises(QueueRejected, match="queue_full"):
            await q.acquire(priority=1)
        with pytest.raises(QueueRejected) as info:
            await q.acquire(priority=-1)
        assert info.value.reason == "shed"

    run(main())


def test_waiters_time_out():
    async def main():
        q = make_queue(capacity=1, max_wait_s=0.05)
        await q.acquire()
        with pytest.raises(QueueRejected) as info:
            await q.acquire()
        assert info.value.reason == "timeout"
        assert (q.depth, q.inflight) == (0, 1)
        q.release()  # the slot frees later: nobody is waiting for it any more
        assert q.inflight == 0 and q.try_admit()

    run(main())


def test_with_no_replica_ready_requests_wait_for_capacity():
    async def main():
        q = AdmissionQueue(max_queue=5, max_wait_s=5.0)
        tasks = [asyncio.create_task(q.acquire(p)) for p in (0, 2, 1)]
        await settle()
        assert (q.depth, q.inflight, q.capacity) == (3, 0, 0)
        q.set_capacity(2)  # a replica became ready
        await settle()
        assert [t.done() for t in tasks] == [False, True, True]
        assert (q.depth, q.inflight) == (1, 2)
        q.release()
        await asyncio.gather(*tasks)

    run(main())


def test_lowering_capacity_evicts_nobody():
    async def main():
        q = make_queue(capacity=3)
        for _ in range(3):
            await q.acquire()
        q.set_capacity(1)
        pending = asyncio.create_task(q.acquire())
        q.release()
        q.release()
        await settle()
        assert not pending.done()  # still 1 in flight at capacity 1
        q.release()
        await pending
        assert q.inflight == 1

    run(main())


def test_a_cancelled_waiter_leaves_the_queue():
    async def main():
        q = make_queue(capacity=1)
        await q.acquire()
        order: list[str] = []
        first = asyncio.create_task(waiter(q, "first", order))
        second = asyncio.create_task(waiter(q, "second", order))
        await settle()
        first.cancel()
        await settle()
        assert q.depth == 1
        q.release()
        await second
        assert order == ["second"] and q.inflight == 1

    run(main())


def test_cancelled_right_after_admission_gives_the_slot_back():
    async def main():
        q = make_queue(capacity=1)
        await q.acquire()
        task = asyncio.create_task(q.acquire())
        await settle()
        q.release()  # hands the slot to the waiter ...
        task.cancel()  # ... which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (q.inflight, q.depth) == (0, 0)

    run(main())


def test_release_without_admission_is_an_error():
    q = make_queue()
    with pytest.raises(RuntimeError, match="without a matching admission"):
        q.release()


def test_slot_context_manager_releases_on_error():
    async def main():
        q = make_queue(capacity=1)
        with pytest.raises(KeyError):
            async with q.slot():
                assert q.inflight == 1
                raise KeyError("boom")
        assert q.inflight == 0

    run(main())


def test_oldest_wait_and_retry_after_follow_the_injected_clock():
    async def main():
        clock = FakeClock()
        q = make_queue(capacity=1, max_queue=1, max_wait_s=30.0, clock=clock)
        await q.acquire()
        task = asyncio.create_task(q.acquire())
        await settle()
        clock.now += 4.0
        assert q.oldest_wait_s() == 4.0
        assert q.oldest_wait_s(clock.now + 1) == 5.0
        assert q.retry_after_s() == 30.0  # no release seen yet: max_wait_s
        clock.now += 2.0
        q.release()  # the slot passes to the waiter
        await task
        assert q.oldest_wait_s() == 0.0
        clock.now += 2.0
        q.release()  # a release every 2 s
        await q.acquire()
        blocked = asyncio.create_task(q.acquire())
        await settle()
        with pytest.raises(QueueRejected) as info:
            await q.acquire()
        # one waiting ahead plus the arrival itself, at 2 s per release
        assert info.value.retry_after_s == pytest.approx(4.0)
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)

    run(main())


def test_constructor_and_capacity_validation():
    with pytest.raises(ValueError):
        AdmissionQueue(max_queue=-1, max_wait_s=1)
    with pytest.raises(ValueError):
        AdmissionQueue(max_queue=1, max_wait_s=float("nan"))
    with pytest.raises(ValueError):
        AdmissionQueue(max_queue=1, max_wait_s=1, shed_backlog=0)
    with pytest.raises(ValueError):
        AdmissionQueue(max_queue=1, max_wait_s=1).set_capacity(-1)


def test_no_slot_leaks_under_random_cancellation_and_timeouts():
    async def main():
        rng = random.Random(42)
        q = make_queue(capacity=3, max_queue=8, max_wait_s=0.02)
        outcomes: list[str] = []

        async def client(i: int) -> None:
            await asyncio.sleep(rng.random() * 0.01)
            try:
                async with q.slot(priority=rng.randint(-2, 2)):
                    await asyncio.sleep(rng.random() * 0.005)
                outcomes.append("ok")
            except QueueRejected as e:
                outcomes.append(e.reason)

        tasks = [asyncio.create_task(client(i)) for i in range(300)]
        for _ in range(40):
            await asyncio.sleep(0.001)
            victim = rng.choice(tasks)
            victim.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (q.inflight, q.depth) == (0, 0)
        assert "ok" in outcomes
        assert q.try_admit()  # every slot is free again

    run(main())
