"""The gateway's proxy in front of fake replicas (real HTTP, in-process threads):
version choice, retries, ejection, the admission queue, scale from zero, weight
changes under load, resume against a replica that breaks mid-stream."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.gateway.fakes import (
    FakeReplica,
    fleet,
    gateway,
    metric,
    ready,
    running,
    wait_for,
)


def stream_text(client: httpx.Client, path: str, body: dict, headers: dict | None = None):
    """(text, ids, response headers) of a streamed request."""
    text, ids = [], set()
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            ids.add(chunk["id"])
            for c in chunk["choices"]:
                text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(text), ids, r.headers


def test_header_pins_version_and_response_names_it():
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url], "v2": [sb.url]})) as (c, app):
        ready(app)
        for version, fake in (("v1", a), ("v2", b)):
            r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3},
                       headers={"x-lmfleet-version": version})  # fmt: skip
            assert r.status_code == 200
            assert r.headers["x-lmfleet-version"] == version
            assert r.json()["id"].startswith(f"cmpl-{fake.name}")
            text, _, headers = stream_text(c, "/v1/chat/completions",
                                           {"model": "m", "messages": [{"role": "user",
                                            "content": "hi"}], "max_tokens": 3},
                                           {"x-lmfleet-version": version})  # fmt: skip
            assert headers["x-lmfleet-version"] == version
            assert text == " w0 w1 w2"
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                   headers={"x-lmfleet-version": "v9"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-lmfleet-version"


def test_sticky_users_keep_their_version():
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url], "v2": [sb.url]})) as (c, app):
        ready(app)
        seen: dict[str, set[str]] = {}
        for _ in range(3):
            for user in (f"user-{i}" for i in range(12)):
                r = c.post("/v1/completions",
                           json={"model": "m", "prompt": "x", "max_tokens": 1, "user": user})  # fmt: skip
                seen.setdefault(user, set()).add(r.headers["x-lmfleet-version"])
        assert all(len(v) == 1 for v in seen.values())
        assert {next(iter(v)) for v in seen.values()} == {"v1", "v2"}


def test_session_header_stickiness():
    a, b = FakeReplica("a"), FakeReplica("b")
    doc = fleet({"v1": [], "v2": []}, stickiness={"by_user": False, "header": "x-session-id"})
    with running(a, b) as (sa, sb):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        doc["models"][0]["versions"][1]["replicas"] = [sb.url]
        with gateway(doc) as (c, app):
            ready(app)
            for s in range(6):
                got = {
                    c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1},
                           headers={"x-session-id": f"s{s}"}).headers["x-lmfleet-version"]
                    for _ in range(3)
                }  # fmt: skip
                assert len(got) == 1


def test_503_from_draining_replica_is_retried_elsewhere_and_ejects_it():
    bad, good = FakeReplica("bad", status=503), FakeReplica("good")
    with running(bad, good) as (sb, sg), gateway(fleet({"v1": [sb.url, sg.url]})) as (c, app):
        ready(app)
        for i in range(6):
            r = c.post("/v1/completions", json={"model": "m", "prompt": f"p{i}", "max_tokens": 2})
            assert r.status_code == 200 and "good" in r.json()["id"]
            text, _, _ = stream_text(c, "/v1/completions", {"model": "m", "prompt": "q"})
            assert text.startswith(" w0")
        assert len(bad.requests) >= 1
        assert metric(c, "lmfleet_gateway_retries_total", model="m", version="v1") >= 1


def test_all_replicas_failing_relays_the_error():
    bad = FakeReplica("bad", status=429)
    with running(bad) as (sb,), gateway(fleet({"v1": [sb.url]})) as (c, app):
        ready(app)
        r = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert "bad says 429" in r.json()["error"]["message"]


def test_ejection_and_readmission_follow_state():
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url, sb.url]})) as (c, app):
        ready(app)
        reg = app.state.gateway.registry
        entry = reg.version("m", "v1")
        a.state = "draining"
        wait_for(lambda: not entry.replicas[sa.url].routable)
        before = len(a.requests)
        for i in range(5):
            assert (
                c.post("/v1/completions", json={"model": "m", "prompt": f"{i}"}).status_code == 200
            )
        assert len(a.requests) == before
        a.state = "ready"
        wait_for(lambda: entry.replicas[sa.url].routable)
        for i in range(8):
            c.post("/v1/completions", json={"model": "m", "prompt": f"{i}"})
        assert len(a.requests) > before


def test_connection_refused_ejects_replica():
    good = FakeReplica("good")
    # a port bound but not listening refuses connections, and stays ours meanwhile
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    # round-robin, so the dead replica is tried; no polls after the first, so only
    # the proxy's connection error can eject it
    with running(good) as (sg,):
        doc = fleet({"v1": [sg.url]}, balancing={"policy": "round_robin"},
                    gateway={"poll_interval_s": 60})  # fmt: skip
        with gateway(doc) as (c, app):
            ready(app)
            reg = app.state.gateway.registry
            info = reg.add_replica("m", "v1", dead_url)
            info.routable = True  # pretend a poll saw it ready just before it died
            reg.version("m", "v1").refresh_capacity()
            for i in range(4):
                r = c.post("/v1/completions", json={"model": "m", "prompt": f"{i}"})
                assert r.status_code == 200
            assert not info.routable
            assert info.last_error.startswith("connect:")
    closed.close()


def test_streams_reuse_upstream_connections():
    a = FakeReplica("a")
    with running(a) as (sa,), gateway(fleet({"v1": [sa.url]})) as (c, app):
        ready(app)
        for i in range(10):
            text, _, _ = stream_text(
                c, "/v1/completions", {"model": "m", "prompt": f"p{i}", "max_tokens": 4}
            )
            assert text
        # polls and streams share keep-alive connections: a handful, not one per call
        opened = metric(c, "lmfleet_gateway_upstream_connections_opened_total")
        assert 1 <= opened <= 3


def test_queue_depth_metric_while_replicas_at_cap():
    hold = threading.Event()
    a = FakeReplica("a", hold=hold)
    doc = fleet({"v1": []}, queue={"max_inflight_per_replica": 1, "max_wait_s": 20})
    with running(a) as (sa,):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        with gateway(doc) as (c, app), ThreadPoolExecutor(4) as pool:
            ready(app)
            futures = [
                pool.submit(c.post, "/v1/completions", json={"model": "m", "prompt": str(i)})
                for i in range(4)
            ]
            wait_for(lambda: metric(c, "lmfleet_gateway_queue_depth", model="m", version="v1") == 3)
            wait_for(lambda: a.running == 1)
            hold.set()
            assert [f.result().status_code for f in futures] == [200] * 4
            assert metric(c, "lmfleet_gateway_queue_depth", model="m", version="v1") == 0
            assert metric(c, "lmfleet_gateway_queue_wait_seconds_count", model="m") == 4


def test_queue_full_is_429():
    hold = threading.Event()
    a = FakeReplica("a", hold=hold)
    doc = fleet({"v1": []}, queue={"max_inflight_per_replica": 1, "max_queue": 1})
    with running(a) as (sa,):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        with gateway(doc) as (c, app), ThreadPoolExecutor(3) as pool:
            ready(app)
            first = [pool.submit(c.post, "/v1/completions", json={"model": "m", "prompt": "x"})
                     for _ in range(2)]  # fmt: skip
            wait_for(lambda: metric(c, "lmfleet_gateway_queue_depth", model="m") == 1)
            r = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
            assert r.status_code == 429 and "retry-after" in r.headers
            assert r.json()["error"]["code"] == "queue_full"
            assert r.headers["x-lmfleet-version"] == "v1"  # errors name the version too
            hold.set()
            assert all(f.result().status_code == 200 for f in first)


def test_scale_from_zero_waits_for_a_ready_replica():
    a = FakeReplica("a", state="starting")
    with (
        running(a) as (sa,),
        gateway(fleet({"v1": [sa.url]})) as (c, _app),
        ThreadPoolExecutor(1) as pool,
    ):
        fut = pool.submit(c.post, "/v1/completions", json={"model": "m", "prompt": "x"})
        wait_for(lambda: metric(c, "lmfleet_gateway_queue_depth", model="m") == 1)
        assert not fut.done()  # waiting in the queue: no replica is ready
        a.state = "ready"
        r = fut.result(timeout=10)
        assert r.status_code == 200 and r.headers["x-lmfleet-version"] == "v1"


def test_patch_weight_keeps_inflight_stream():
    a, b = FakeReplica("a", gap_s=0.02), FakeReplica("b")
    doc = fleet({"v1": [], "v2": []})
    with running(a, b) as (sa, sb):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        doc["models"][0]["versions"][1]["replicas"] = [sb.url]
        doc["models"][0]["versions"][1]["weight"] = 0
        with gateway(doc) as (c, app), ThreadPoolExecutor(1) as pool:
            ready(app)
            fut = pool.submit(stream_text, c, "/v1/completions",
                              {"model": "m", "prompt": "x", "max_tokens": 30})  # fmt: skip
            wait_for(lambda: len(a.requests) == 1)
            for version, weight in (("v1", 0), ("v2", 1)):
                r = c.patch(f"/admin/models/m/versions/{version}", json={"weight": weight})
                assert r.status_code == 200, r.text
            text, _, headers = fut.result(timeout=10)
            assert text == "".join(f" w{i}" for i in range(30))
            assert headers["x-lmfleet-version"] == "v1"
            r = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
            assert r.headers["x-lmfleet-version"] == "v2"
            assert c.patch("/admin/models/m/versions/v7", json={"weight": 1}).status_code == 404
            assert c.patch("/admin/models/m/versions/v1", json={"weight": -1}).status_code == 400


@pytest.mark.parametrize("chat", [False, True])
def test_stream_resumes_on_another_replica(chat):
    a, b = FakeReplica("a", break_after=4), FakeReplica("b", break_after=4)
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url, sb.url]})) as (c, app):
        ready(app)
        if chat:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
        else:
            body = {"model": "m", "prompt": "hello", "max_tokens": 10}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        text, ids, headers = stream_text(c, path, body)
        assert text == "".join(f" w{i}" for i in range(10))
        assert len(ids) == 1 and headers["x-lmfleet-version"] == "v1"
        assert metric(c, "lmfleet_gateway_stream_resumes_total", outcome="ok") == 1
        first, cont = sorted(
            a.requests + b.requests, key=lambda r: isinstance(r["body"].get("prompt"), list)
        )
        assert first["path"] == path
        assert cont["path"] == "/v1/completions"
        assert cont["body"]["max_tokens"] == 6
        assert cont["body"]["prompt"][-4:] == [1000, 1001, 1002, 1003]


def test_stream_resume_fixes_usage_and_keeps_id():
    a, b = FakeReplica("a", break_after=3), FakeReplica("b", break_after=3)
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url, sb.url]})) as (c, app):
        ready(app)
        chunks = []
        body = {"model": "m", "prompt": "a b", "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with c.stream("POST", "/v1/completions", json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        assert text == "".join(f" w{i}" for i in range(8))
        assert {ch["id"] for ch in chunks} == {chunks[0]["id"]}
        # the fake counts the continuation's prompt as 3 tokens: 3 - 3 sent + ...
        assert chunks[-1]["usage"]["completion_tokens"] == 5 + 3


def test_stream_that_cannot_resume_ends_with_an_error_event():
    a, b = FakeReplica("a", break_after=2), FakeReplica("b", break_after=2)
    with running(a, b) as (sa, sb), gateway(fleet({"v1": [sa.url, sb.url]})) as (c, app):
        ready(app)
        body = {"model": "m", "prompt": "x", "max_tokens": 5, "stream": True, "n": 2}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "error" in json.loads(lines[-1][6:])
        assert metric(c, "lmfleet_gateway_stream_resumes_total", outcome="impossible") == 1


def test_unknown_model_bad_json_and_body_limit():
    a = FakeReplica("a")
    doc = fleet({"v1": []}, gateway={"max_body_bytes": 1000})
    with running(a) as (sa,):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        with gateway(doc) as (c, _app):
            r = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = c.post(
                "/v1/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
            r = c.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000})
            assert r.status_code == 413
            models = c.get("/v1/models").json()
            assert [m["id"] for m in models["data"]] == ["m"]
            assert c.get("/health").status_code == 200


def test_upstream_model_name_is_rewritten():
    a = FakeReplica("a")
    doc = fleet({"v1": []})
    with running(a) as (sa,):
        doc["models"][0]["versions"][0].update(replicas=[sa.url], served_model_name="llama-8b")
        with gateway(doc) as (c, app):
            ready(app)
            c.post("/v1/completions", json={"model": "m", "prompt": "x"})
            assert a.requests[-1]["body"]["model"] == "llama-8b"


def test_shadow_traffic_is_mirrored_and_discarded():
    a, b = FakeReplica("a"), FakeReplica("b")
    doc = fleet({"v1": [], "v2": []}, shadow={"version": "v2", "percent": 100})
    with running(a, b) as (sa, sb):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        doc["models"][0]["versions"][1].update(replicas=[sb.url], weight=0)
        with gateway(doc) as (c, app):
            ready(app)
            for stream in (False, True):
                for i in range(3):
                    body = {"model": "m", "prompt": f"{i}", "max_tokens": 2, "stream": stream}
                    r = c.post("/v1/completions", json=body)
                    assert r.headers["x-lmfleet-version"] == "v1"
            wait_for(lambda: len(b.requests) == 6)
            wait_for(lambda: metric(c, "lmfleet_gateway_shadow_requests_total",
                                    version="v2", outcome="ok") == 6)  # fmt: skip
            ab = c.get("/admin/ab/m").json()
            assert ab["versions"]["v2"]["requests"] == 6
            assert ab["versions"]["v1"]["requests"] == 6


def test_shadow_copies_only_use_spare_capacity():
    """The shadow version serves its own traffic too. Copies of the primary's
    requests used to take its replica's slots without a queue slot, and its own
    admitted requests then found no free replica (503). Now a copy takes a free slot
    or is skipped (counted), and the version's own requests all succeed."""
    a, b = FakeReplica("a", delay_s=0.05), FakeReplica("b", delay_s=0.05)
    doc = fleet({"v1": [], "v2": []}, shadow={"version": "v2", "percent": 100},
                queue={"max_inflight_per_replica": 1, "max_wait_s": 30})  # fmt: skip
    with running(a, b) as (sa, sb):
        doc["models"][0]["versions"][0]["replicas"] = [sa.url]
        doc["models"][0]["versions"][1].update(replicas=[sb.url], weight=0)
        with gateway(doc) as (c, app), ThreadPoolExecutor(16) as pool:
            ready(app)

            def one(i: int) -> int:
                pin = {"x-lmfleet-version": "v2"} if i % 2 else {}
                body = {"model": "m", "prompt": f"{i}", "max_tokens": 2}
                return c.post("/v1/completions", json=body, headers=pin).status_code

            codes = list(pool.map(one, range(60)))
            assert codes == [200] * 60
            wait_for(lambda: not app.state.proxy.shadows.in_flight)
            sent = metric(c, "lmfleet_gateway_shadow_requests_total", outcome="ok")
            skipped = metric(c, "lmfleet_gateway_shadow_skipped_total", reason="no_capacity")
            assert skipped >= 1 and sent + skipped == 30
            assert metric(c, "lmfleet_gateway_shadow_requests_total", outcome="error") == 0
