"""The replica registry on its own, over a scripted pool (no HTTP): adding and
removing replicas, reloads that keep the added ones, ejection and re-admission by
polls and by the proxy, a dead engine, and which weight wins after a reload."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lmfleet.fleet.config import parse_config
from lmfleet.gateway.registry import ENGINE_DEAD, Registry, UnknownTarget, replica_id_of
from lmfleet.gateway.upstream import ConnectFailed
from tests.gateway.fakes import fleet

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


class ScriptedPool:
    """``fetch`` answers ``/state`` from ``states[url]``: a dict (200 with it as
    JSON) or an exception to raise."""

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}

    async def fetch(self, base_url: str, path: str, **_: Any) -> tuple[int, bytes]:
        answer = self.states.get(base_url, ConnectFailed("refused"))
        if isinstance(answer, BaseException):
            raise answer
        return 200, json.dumps(answer).encode()

    async def aclose(self) -> None:
        return None


def ready_state(**extra: Any) -> dict[str, Any]:
    return {"state": "ready", "ready": True, "running": 1, "waiting": 2, **extra}


def registry(doc: dict[str, Any]) -> tuple[Registry, ScriptedPool]:
    pool = ScriptedPool()
    return Registry(parse_config(doc), pool=pool), pool  # type: ignore[arg-type]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_added_replicas_are_routable_only_after_a_ready_poll():
    reg, pool = registry(fleet({"v1": [A]}, queue={"max_inflight_per_replica": 4}))
    entry = reg.version("m", "v1")
    info = reg.add_replica("m", "v1", B + "/")
    assert (info.url, info.source, info.routable) == (B, "dynamic", False)
    assert reg.add_replica("m", "v1", B) is info  # adding twice keeps one entry
    pool.states = {A: ready_state(), B: {"state": "starting", "ready": False}}
    run(reg.poll_once())
    assert [r.url for r in entry.routable()] == [A] and entry.queue.capacity == 4
    assert (info.state, info.last_error) == ("starting", "state starting")
    pool.states[B] = ready_state(kv_cache_usage=0.5)
    run(reg.poll_once())
    assert {r.url for r in entry.routable()} == {A, B} and entry.queue.capacity == 8
    assert (info.running, info.waiting, info.kv_usage) == (1, 2, 0.5)


@pytest.mark.parametrize("url", ["", "not a url", "ftp://h:1", "http://h:99999", "http://:80"])
def test_a_replica_that_could_never_be_routed_is_refused(url):
    reg, _ = registry(fleet({"v1": [A]}))
    with pytest.raises(ValueError):
        reg.add_replica("m", "v1", url)
    assert list(reg.version("m", "v1").replicas) == [A]


def test_remove_by_url_and_by_id():
    reg, _ = registry(fleet({"v1": [A]}))
    reg.add_replica("m", "v1", B)
    info = reg.replica_by_id("m", "v1", replica_id_of(B))
    assert info.url == B and info.id == replica_id_of(B + "/")
    reg.remove_replica("m", "v1", B)
    with pytest.raises(UnknownTarget):
        reg.remove_replica("m", "v1", B)
    with pytest.raises(UnknownTarget):
        reg.replica_by_id("m", "v1", info.id)
    with pytest.raises(UnknownTarget):
        reg.add_replica("m", "v9", C)


def test_reload_replaces_the_files_replicas_and_keeps_dynamic_ones():
    doc = fleet({"v1": [A, B]})
    reg, pool = registry(doc)
    pool.states = {A: ready_state(), B: ready_state(), C: ready_state()}
    dynamic = reg.add_replica("m", "v1", C)
    run(reg.poll_once())
    kept = reg.version("m", "v1").replicas[A]
    kept.inflight = 3  # a request in flight holds this object
    queue = reg.version("m", "v1").queue
    doc["models"][0]["versions"][0]["replicas"] = [A]
    reg.apply_config(parse_config(doc))
    entry = reg.version("m", "v1")
    assert set(entry.replicas) == {A, C}
    assert entry.replicas[A] is kept and entry.replicas[C] is dynamic
    assert entry.queue is queue  # unchanged queue settings: the same queue
    assert entry.queue.capacity == 2 * 256
    # a reload that changes the queue settings gets a new queue
    doc["models"][0]["queue"] = {"max_queue": 7}
    reg.apply_config(parse_config(doc))
    assert reg.version("m", "v1").queue is not queue


def test_ejection_by_polls_and_readmission():
    reg, pool = registry(fleet({"v1": [A, B]}))
    pool.states = {A: ready_state(), B: ready_state()}
    run(reg.poll_once())
    a = reg.version("m", "v1").replicas[A]
    # a timeout is a busy replica: ejected only after 3 polls in a row
    pool.states[A] = TimeoutError()
    for _ in range(2):
        run(reg.poll_once())
        assert a.routable
    run(reg.poll_once())
    assert not a.routable and a.state == "unreachable" and a.ejections == 1
    pool.states[A] = ready_state()
    run(reg.poll_once())
    assert a.routable and a.last_error is None and a.poll_failures == 0
    # refused: at once
    pool.states[A] = ConnectFailed("refused")
    run(reg.poll_once())
    assert not a.routable and a.ejections == 2
    # draining: out of rotation until it is ready again
    pool.states[A] = {"state": "draining", "ready": False}
    run(reg.poll_once())
    assert (a.routable, a.state) == (False, "draining")
    pool.states[A] = ready_state()
    run(reg.poll_once())
    assert a.routable


def test_a_dead_engine_keeps_the_replica_out_until_it_is_replaced():
    reg, pool = registry(fleet({"v1": [A, B]}))
    pool.states = {A: ready_state(), B: ready_state()}
    run(reg.poll_once())
    entry = reg.version("m", "v1")
    a = entry.replicas[A]
    reg.mark_dead(a, "answered 503 engine_dead")  # what the proxy does
    assert (a.routable, a.state) == (False, ENGINE_DEAD) and entry.queue.capacity == 256
    # the dead replica's /state says so until it exits
    pool.states[A] = {**ready_state(), "ready": False, "engine_dead": True}
    run(reg.poll_once())
    assert (a.routable, a.state) == (False, ENGINE_DEAD)
    # a supervisor restarted it on the same address
    pool.states[A] = ready_state()
    run(reg.poll_once())
    assert a.routable and a.state == "ready"


def test_a_run_time_weight_survives_reloads_until_the_files_weight_changes():
    doc = fleet({"v1": [A], "v2": [B]})
    reg, _ = registry(doc)
    reg.set_weight("m", "v2", 0.0)
    reg.apply_config(parse_config(doc))
    assert reg.version("m", "v2").weight == 0  # the file still says 1: the operator's 0 holds
    doc["models"][0]["versions"][1]["weight"] = 3
    reg.apply_config(parse_config(doc))
    assert reg.version("m", "v2").weight == 3 and ("m", "v2") not in reg.overrides
    # a running rollout's lock holds whatever the file says
    reg.set_weight("m", "v2", 10.0, owner="rollout", locked=True)
    doc["models"][0]["versions"][1]["weight"] = 4
    reg.apply_config(parse_config(doc))
    assert reg.version("m", "v2").weight == 10
    # a version that leaves the file takes its run-time weight with it
    doc["models"][0]["versions"].pop()
    reg.apply_config(parse_config(doc))
    assert ("m", "v2") not in reg.overrides


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -1.0])
def test_weights_must_be_finite_and_at_least_0(weight):
    reg, _ = registry(fleet({"v1": [A]}))
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        reg.set_weight("m", "v1", weight)
    assert reg.version("m", "v1").weight == 1
