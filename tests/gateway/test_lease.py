"""ReplicaLease on its own (raise, release once, hand over, a forgotten lease), and
the in-flight counts through the gateway: after unary answers, streams, a client
that goes away mid-stream, a 429 tried elsewhere, a stream resumed on another
replica and shadow copies, every replica's count is back to 0."""

from __future__ import annotations

import gc
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmfleet.gateway.lease import ReplicaLease
from lmfleet.gateway.registry import ReplicaInfo
from tests.gateway.fakes import FakeReplica, fleet, gateway, metric, ready, running, wait_for


def replica() -> ReplicaInfo:
    return ReplicaInfo(url="http://a:8000", model="m", version="v1")


def test_a_lease_raises_the_count_and_releasing_lowers_it_once():
    r = replica()
    first, second = ReplicaLease(r), ReplicaLease(r)
    assert r.inflight == 2 and first.held
    first.release()
    first.release()
    assert r.inflight == 1 and not first.held
    second.release()
    assert r.inflight == 0


def test_a_with_block_releases_however_it_ends():
    r = replica()
    with ReplicaLease(r) as lease:
        assert r.inflight == 1
        lease.release()  # released early: leaving the block leaves the count alone
    assert r.inflight == 0
    with pytest.raises(ValueError), ReplicaLease(r):
        raise ValueError("the try failed")
    assert r.inflight == 0


def test_hand_over_keeps_the_count_past_the_block():
    r = replica()
    with ReplicaLease(r) as lease:
        kept = lease.hand_over()
    assert r.inflight == 1 and kept.held and not lease.held
    kept.release()
    assert r.inflight == 0
    with pytest.raises(RuntimeError, match="already released"):
        kept.hand_over()


def test_a_forgotten_lease_warns_and_gives_the_count_back():
    r = replica()
    lease = ReplicaLease(r)
    with pytest.warns(ResourceWarning, match="never released"):
        del lease
        gc.collect()
    assert r.inflight == 0


def test_released_and_handed_over_leases_go_quietly():
    r = replica()
    released, old = ReplicaLease(r), ReplicaLease(r)
    released.release()
    new = old.hand_over()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        del released, old
        gc.collect()
    assert seen == [] and r.inflight == 1
    new.release()


# ---- through the gateway -----------------------------------------------------------------


def _stream(client: httpx.Client, version: str, max_tokens: int) -> str:
    body = {"model": "m", "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    text = []
    with client.stream("POST", "/v1/completions", json=body,
                       headers={"x-lmfleet-version": version}) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.extend(c["text"] for c in chunk["choices"])
    return "".join(text)


def _unary(client: httpx.Client, version: str | None) -> int:
    headers = {"x-lmfleet-version": version} if version else {}
    body = {"model": "m", "prompt": "hi", "max_tokens": 3}
    return client.post("/v1/completions", json=body, headers=headers).status_code


def test_every_path_gives_the_in_flight_counts_back():
    busy, good = FakeReplica("busy", status=429), FakeReplica("good")  # v1: 429 → retried
    breaks, other = FakeReplica("breaks", break_after=3), FakeReplica("other")  # v2: resumes
    slow = FakeReplica("slow", gap_s=0.05)  # v3: the client goes away mid-stream
    mirror = FakeReplica("mirror")  # v4: the shadow of v1
    fakes = (busy, good, breaks, other, slow, mirror)
    with running(*fakes) as servers:
        urls = [s.url for s in servers]
        doc = fleet(
            {"v1": urls[0:2], "v2": urls[2:4], "v3": urls[4:5], "v4": urls[5:6]},
            balancing={"policy": "round_robin"}, shadow={"version": "v4", "percent": 100},
        )  # fmt: skip
        for v in doc["models"][0]["versions"][1:]:
            v["weight"] = 0  # unpinned requests go to v1, and are mirrored to v4
        with gateway(doc) as (c, app), ThreadPoolExecutor(6) as pool:
            ready(app)
            reg = app.state.gateway.registry
            infos = [r for v in reg.all_versions() for r in v.replicas.values()]
            unary = [pool.submit(_unary, c, v) for v in [None] * 6 + ["v2", "v3"] * 2]
            streams = [pool.submit(_stream, c, v, 8) for v in ["v1", "v2"] * 3]

            body = {"model": "m", "prompt": "go on", "max_tokens": 200, "stream": True}
            with c.stream("POST", "/v1/completions", json=body,
                          headers={"x-lmfleet-version": "v3"}) as r:  # fmt: skip
                lines = r.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
                assert reg.version("m", "v3").replicas[urls[4]].inflight >= 1
            # the client is gone mid-stream

            assert [f.result() for f in unary] == [200] * 10
            want = "".join(f" w{i}" for i in range(8))
            assert [f.result() for f in streams] == [want] * 6
            wait_for(lambda: metric(c, "lmfleet_gateway_requests_total",
                                    outcome="client_disconnect") == 1)  # fmt: skip
            wait_for(lambda: not app.state.proxy.shadows.in_flight)
            wait_for(lambda: all(r.inflight == 0 for r in infos), 10)
            assert metric(c, "lmfleet_gateway_retries_total", version="v1") >= 1
            assert metric(c, "lmfleet_gateway_stream_resumes_total", outcome="ok") >= 1
            assert metric(c, "lmfleet_gateway_shadow_requests_total", outcome="ok") >= 1
            assert len(busy.requests) >= 1 and len(mirror.requests) >= 1
