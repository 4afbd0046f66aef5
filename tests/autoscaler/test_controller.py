"""The controller against an in-memory provider and a gateway state without real
replicas (their /state polls are scripted): what it observes, what it asks the
provider for, in which order, and what it keeps. The end-to-end behaviour with real
processes is in test_up.py."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
from typing import Any

import pytest

from lmfleet.autoscaler.controller import Controller
from lmfleet.autoscaler.observation import ReplicaPhase
from lmfleet.autoscaler.providers.base import (
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStatus,
    UnknownReplica,
)
from lmfleet.fleet.config import parse_config
from lmfleet.gateway.registry import ReplicaInfo
from lmfleet.gateway.state import GatewayState


class FakeProvider:
    """Replicas as records; the test moves them through their states."""

    def __init__(self) -> None:
        self.handles: dict[str, ReplicaHandle] = {}
        self.calls: list[tuple[str, str]] = []
        self.ready: dict[str, asyncio.Event] = {}
        self._ids = itertools.count(1)
        #: what the gateway knew of the replica when drain/sleep was called
        self.seen_at_call: dict[str, Any] = {}
        self.on_call: Any = None

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        rid = f"r{next(self._ids)}"
        h = ReplicaHandle(rid, spec.version, ReplicaStatus.STARTING, None, 1000 + len(self.handles),
                          None, started_at=0.0, since=0.0)  # fmt: skip
        self.handles[rid] = h
        self.ready[rid] = asyncio.Event()
        self.calls.append(("start", rid))
        return h

    def set(self, rid: str, state: ReplicaStatus, **changes: Any) -> None:
        self.handles[rid] = dataclasses.replace(self.handles[rid], state=state, **changes)
        if state is ReplicaStatus.READY:
            self.ready[rid].set()

    async def wait_ready(self, rid: str) -> ReplicaHandle:
        await self.ready[rid].wait()
        return self.handles[rid]

    async def _call(self, verb: str, rid: str) -> None:
        if rid not in self.handles:
            raise UnknownReplica(rid)
        self.calls.append((verb, rid))
        if self.on_call is not None:
            self.on_call(verb, rid)

    async def wake(self, rid: str) -> ReplicaHandle:
        await self._call("wake", rid)
        self.set(rid, ReplicaStatus.READY, wake_s=0.5)
        return self.handles[rid]

    async def sleep(self, rid: str) -> ReplicaHandle:
        await self._call("sleep", rid)
        self.set(rid, ReplicaStatus.ASLEEP)
        return self.handles[rid]

    async def drain(self, rid: str, timeout_s: float | None = None) -> ReplicaHandle:
        await self._call("drain", rid)
        return self.handles.pop(rid)

    async def stop(self, rid: str, *, grace_s: float | None = None) -> ReplicaHandle:
        await self._call("stop", rid)
        return self.handles.pop(rid)

    async def list(self) -> list[ReplicaHandle]:
        return list(self.handles.values())

    async def close(self, *, grace_s: float | None = None) -> None:
        self.handles.clear()


def _fleet(**version: Any):
    v = {"name": "v1", "model": "sim:llama-8b-h100", "replicas": {"min": 1, "max": 4},
         "autoscaling": {"target_per_replica": 2, "stabilization_window_s": 0,
                         "panic_window_s": 0, "scale_ahead": False}, **version}  # fmt: skip
    return parse_config({"models": [{"name": "chat", "versions": [v]}],
                         "autoscaler": {"history": 5}})  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def rig(monkeypatch):
    """(controller, provider, state, clock, polls): ``polls[url]`` is what a
    replica's next /state poll reports."""

    def make(config=None, dry_run=None):
        config = config or _fleet()
        state = GatewayState(config)
        provider = FakeProvider()
        clock = Clock()
        polls: dict[str, dict[str, Any]] = {}

        async def poll(info: ReplicaInfo) -> None:
            data = polls.get(info.url, {"state": "ready", "running": 0, "waiting": 0})
            info.running, info.waiting = data["running"], data["waiting"]
            info.state = data["state"]
            info.routable = data["state"] == "ready" and info.in_rotation

        monkeypatch.setattr(state.registry, "poll_replica", poll)
        controller = Controller(state, provider, config, clock=clock, dry_run=dry_run)
        return controller, provider, state, clock, polls

    return make


def run_async(fn):
    """Run an async test on a fresh event loop (bounded: a hang fails it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@run_async
async def test_min_replicas_start_and_are_registered_once_ready(rig):
    controller, provider, state, clock, _ = rig()
    (record,) = await controller.tick()
    assert (record.desired, record.start) == (1, 1)
    assert provider.calls == [("start", "r1")]
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001", ready_at=2.5)
    await _settle()
    info = state.registry.replica_by_provider_id("r1")
    assert info is not None and info.source == "provider" and info.routable
    assert info.url == "http://127.0.0.1:9001"
    # its cold start is measured: the next observation carries it
    clock.t += 2
    obs = controller.observe(controller.versions["chat/v1"], await provider.list())
    assert obs.time_to_ready_s == 2.5
    assert state.version_stats.window("chat", "v1").time_to_ready_s == 2.5
    await controller.close()


@run_async
async def test_a_replica_starting_is_in_the_next_observation_and_not_started_again(rig):
    controller, provider, _, clock, _ = rig()
    await controller.tick()
    clock.t += 2
    (record,) = await controller.tick()
    assert record.start == 0 and provider.calls == [("start", "r1")]
    await controller.close()


@run_async
async def test_in_flight_is_the_larger_of_the_gateways_count_and_the_replicas(rig):
    controller, provider, state, _clock, polls = rig()
    await controller.tick()
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001")
    polls["http://127.0.0.1:9001"] = {"state": "ready", "running": 3, "waiting": 2}
    await _settle()
    info = state.registry.replica_by_provider_id("r1")
    v = controller.versions["chat/v1"]
    (view,) = controller.observe(v, await provider.list()).replicas
    assert (view.in_flight, view.waiting) == (5, 2)  # the replica's own count
    info.inflight = 7  # the gateway has sent more than the last poll saw
    (view,) = controller.observe(v, await provider.list()).replicas
    assert (view.in_flight, view.waiting) == (7, 2)
    state.registry.version("chat", "v1").queue.depth  # noqa: B018 (exists)
    await controller.close()


@run_async
async def test_a_burst_starts_replicas_and_scale_down_drains_out_of_rotation_first(rig):
    controller, provider, state, clock, _polls = rig()
    await controller.tick()
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001")
    await _settle()
    info = state.registry.replica_by_provider_id("r1")
    info.inflight = 6  # 6 requests at 2 per replica: 3 replicas
    clock.t += 2
    (up,) = await controller.tick()
    assert (up.desired, up.start) == (3, 2)
    for rid, port in (("r2", 9002), ("r3", 9003)):
        provider.set(rid, ReplicaStatus.READY, url=f"http://127.0.0.1:{port}")
    await _settle()
    assert len(state.registry.version("chat", "v1").routable()) == 3
    # the load falls to one request, on r1: the victims are the idle ones
    infos = {rid: state.registry.replica_by_provider_id(rid) for rid in ("r1", "r2", "r3")}
    info.inflight = 1
    seen = {}
    provider.on_call = lambda verb, rid: seen.setdefault(
        rid, (infos[rid].in_rotation, infos[rid].routable))  # fmt: skip
    clock.t += 2
    (down,) = await controller.tick()
    assert down.desired == 2 and len(down.drain) == 1 and down.drain[0] != "r1"
    await _settle()
    victim = down.drain[0]
    assert seen[victim] == (False, False)  # out of rotation before the drain began
    assert state.registry.replica_by_provider_id(victim) is None  # removed once stopped
    await controller.close()


@run_async
async def test_actions_in_progress_shape_the_observation(rig):
    controller, provider, _state, _clock, _ = rig()
    await controller.tick()
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001")
    await _settle()
    v = controller.versions["chat/v1"]
    blocker = asyncio.Event()
    controller._act("r1", "sleep", blocker.wait())
    ((view,),) = [controller.observe(v, await provider.list()).replicas]
    assert view.state is ReplicaPhase.ASLEEP
    controller._cancel("r1")
    controller._act("r1", "drain", blocker.wait())
    (view,) = controller.observe(v, await provider.list()).replicas
    assert view.state is ReplicaPhase.DRAINING
    blocker.set()
    await controller.close()


@run_async
async def test_a_dead_replica_is_forgotten_and_replaced(rig):
    controller, provider, state, clock, _ = rig()
    await controller.tick()
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001")
    await _settle()
    provider.set("r1", ReplicaStatus.DEAD, detail="exited with status -9 (SIGKILL)")
    clock.t += 2
    (record,) = await controller.tick()
    assert ("stop", "r1") in provider.calls
    assert state.registry.replica_by_provider_id("r1") is None
    assert record.start == 1 and provider.calls[-1] == ("start", "r2")
    await controller.close()


@run_async
async def test_dry_run_decides_and_records_but_asks_the_provider_nothing(rig):
    controller, provider, _, _clock, _ = rig(dry_run=True)
    (record,) = await controller.tick()
    assert record.start == 1 and record.dry_run
    assert provider.calls == []
    snap = await controller.snapshot()
    assert snap["dry_run"] is True and snap["decisions"][0]["start"] == 1


@run_async
async def test_quiet_rounds_are_not_kept_in_the_history(rig):
    controller, _provider, _, clock, _ = rig()
    for _ in range(4):  # a start, then rounds that hold while it loads
        await controller.tick()
        clock.t += 2
    assert [r.start for r in controller.history] == [1]
    assert controller.versions["chat/v1"].last is not None  # the last round is known
    await controller.close()


@run_async
async def test_the_history_is_bounded(rig):
    controller, _provider, _, clock, _ = rig(dry_run=True)
    for _ in range(8):  # a dry run asks for its start every round: each is kept
        await controller.tick()
        clock.t += 2
    assert len(controller.history) == 5
    snap = await controller.snapshot()
    assert [d["start"] for d in snap["decisions"]] == [1] * 5
    assert snap["versions"]["chat/v1"]["min"] == 1 and snap["versions"]["chat/v1"]["max"] == 4
    assert snap["ticks"] == 8


@run_async
async def test_a_version_with_autoscaling_off_is_left_alone(rig):
    controller, provider, _, _, _ = rig(_fleet(autoscaling={"enabled": False}))
    assert await controller.tick() == []
    assert provider.calls == []


@run_async
async def test_standby_sleeps_once_idle_and_wakes_before_a_cold_start(rig):
    config = _fleet(replicas={"min": 1, "max": 3, "standby": 1})
    controller, provider, state, clock, _polls = rig(config)
    (first,) = await controller.tick()
    assert first.start == 2  # one to serve, one for the pool
    for rid, port in (("r1", 9001), ("r2", 9002)):
        provider.set(rid, ReplicaStatus.READY, url=f"http://127.0.0.1:{port}")
    await _settle()
    clock.t += 2
    (pool,) = await controller.tick()
    assert len(pool.sleep) == 1
    sleeper = pool.sleep[0]
    await _settle()
    assert ("sleep", sleeper) in provider.calls
    assert not state.registry.replica_by_provider_id(sleeper).in_rotation
    # a burst: the sleeper is woken (and back in rotation) before anything cold
    serving = "r1" if sleeper == "r2" else "r2"
    state.registry.replica_by_provider_id(serving).inflight = 4
    clock.t += 2
    (burst,) = await controller.tick()
    assert burst.wake == (sleeper,)
    await _settle()
    assert ("wake", sleeper) in provider.calls
    woken = state.registry.replica_by_provider_id(sleeper)
    assert woken.in_rotation and woken.routable
    assert controller.versions["chat/v1"].wake[-1] == 0.5
    await controller.close()


@run_async
async def test_policy_keda_is_decided_by_the_keda_baseline(rig):
    config = _fleet(autoscaling={"policy": "keda", "keda": {"threshold": 2}})
    controller, provider, state, clock, polls = rig(config)
    (first,) = await controller.tick()
    assert first.start == 1 and "sampled" in first.inputs  # the baseline's inputs
    provider.set("r1", ReplicaStatus.READY, url="http://127.0.0.1:9001")
    polls["http://127.0.0.1:9001"] = {"state": "ready", "running": 4, "waiting": 6}
    await _settle()
    await state.registry.poll_replica(state.registry.replica_by_provider_id("r1"))
    clock.t += 15  # the next poll and HPA sync: 6 waiting at 2 per replica
    (up,) = await controller.tick()
    assert (up.desired, up.start) == (3, 2) and up.reason.startswith("up 1→3: HPA")
    snap = await controller.snapshot()
    assert snap["versions"]["chat/v1"]["policy"] == "keda"
    assert snap["versions"]["chat/v1"]["standby"] == 0
    await controller.close()
