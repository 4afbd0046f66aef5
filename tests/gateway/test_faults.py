"""Failures must not spread: what is retried on another replica and what is not, a
poisoned request among three replicas, a hung replica process (SIGSTOP) under a
non-streaming request, early headers for long non-streaming answers, and bodies the
gateway refuses (deep nesting, not JSON, a fleet file that is not UTF-8)."""

from __future__ import annotations

import json
import signal
import threading
from contextlib import ExitStack

import httpx
import pytest
import yaml

from tests.gateway.fakes import (
    FakeProcess,
    FakeReplica,
    ServerThread,
    fleet,
    gateway,
    gateway_thread,
    metric,
    ready,
    running,
)

POISON = "lmfleet-fault-poison"
#: the replica's own answer for a body that is not JSON (src/lmfleet/server/errors.py)
REPLICA_NOT_JSON = (
    "The request body must be a JSON object, sent with 'Content-Type: application/json'"
)


def _post(c: httpx.Client, prompt: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": "m", "prompt": prompt, "max_tokens": 3, "stream": stream}
    return c.post("/v1/completions", json=body)


def _saw(fake: FakeReplica, marker: str) -> int:
    return sum(1 for r in fake.requests if marker in json.dumps(r["body"]))


@pytest.mark.parametrize("stream", [False, True])
def test_engine_dead_answer_marks_the_replica_dead_and_is_not_retried(stream):
    bad = FakeReplica("bad", status=503, code="engine_dead")
    good = FakeReplica("good")
    # no polls after the first: only the proxy can take the replica out
    doc = fleet({"v1": []}, balancing={"policy": "round_robin"}, gateway={"poll_interval_s": 60})
    with running(bad, good) as (sb, sg):
        doc["models"][0]["versions"][0]["replicas"] = [sb.url, sg.url]
        with gateway(doc) as (c, app):
            ready(app)
            answers = [_post(c, f"p{i}", stream=stream) for i in range(4)]
            failed = [i for i, r in enumerate(answers) if r.status_code != 200]
            assert len(failed) == 1 and len(bad.requests) == 1
            r = answers[failed[0]]
            err = r.json()["error"]
            assert r.status_code == 502 and err["code"] == "replica_failed"
            assert "not sent to another replica" in err["message"]
            assert r.headers["x-lmfleet-version"] == "v1"
            assert _saw(good, f'"p{failed[0]}"') == 0  # never on a second replica
            info = app.state.gateway.registry.version("m", "v1").replicas[sb.url]
            assert (info.routable, info.state) == (False, "engine_dead")
            assert metric(c, "lmfleet_gateway_retries_total") == 0


def test_a_poisoned_request_kills_one_replica_and_the_other_two_keep_serving():
    fakes = [FakeReplica(n, poison=POISON, poison_kills=True) for n in "abc"]
    with running(*fakes) as servers, gateway(fleet({"v1": [s.url for s in servers]})) as (c, app):
        ready(app)
        r = _post(c, f"please {POISON}")
        assert r.status_code == 502 and r.json()["error"]["code"] == "replica_failed"
        assert sum(_saw(f, POISON) for f in fakes) == 1  # one replica, one try
        dead = next(f for f in fakes if f.dead)
        before = len(dead.requests)
        for i in range(20):
            assert _post(c, f"q{i}", stream=i % 2 == 1).status_code == 200
        assert len(dead.requests) == before
        assert sum(1 for f in fakes if f is not dead and f.requests) == 2
        states = {
            x["url"]: x["state"] for x in c.get("/admin/replicas").json()["m"]["v1"]["replicas"]
        }
        assert sorted(states.values()) == ["engine_dead", "ready", "ready"]


def test_a_dead_replica_that_says_it_never_ran_the_request_is_tried_elsewhere():
    """A request that reaches a replica whose engine had already died (before the
    gateway's poll noticed) is safe to send on, when the replica says so with
    ``x-lmfleet-admitted: 0``; the replica is marked dead all the same."""
    dead = FakeReplica("dead", says_not_admitted=True)
    good = FakeReplica("good")
    doc = fleet({"v1": []}, balancing={"policy": "round_robin"}, gateway={"poll_interval_s": 60})
    with running(dead, good) as (sd, sg):
        doc["models"][0]["versions"][0]["replicas"] = [sd.url, sg.url]
        with gateway(doc) as (c, app):
            ready(app)
            dead.dead = True  # after the poll that found it ready
            assert [_post(c, f"p{i}").status_code for i in range(4)] == [200] * 4
            info = app.state.gateway.registry.version("m", "v1").replicas[sd.url]
            assert info.state == "engine_dead" and len(dead.requests) == 1


def test_a_request_that_fails_alone_gets_the_replicas_500_and_is_not_retried():
    fakes = [FakeReplica(n, poison=POISON) for n in "abc"]
    with running(*fakes) as servers, gateway(fleet({"v1": [s.url for s in servers]})) as (c, app):
        ready(app)
        r = _post(c, POISON)
        assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed"
        assert sum(_saw(f, POISON) for f in fakes) == 1
        reg = app.state.gateway.registry
        assert all(x.routable for x in reg.version("m", "v1").replicas.values())
        for i in range(30):
            assert _post(c, f"q{i}").status_code == 200
        assert all(len(f.requests) > 1 for f in fakes)  # all three still serve


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_answers_are_relayed_not_retried(status):
    bad, good = FakeReplica("bad", status=status), FakeReplica("good")
    doc = fleet({"v1": []}, balancing={"policy": "round_robin"})
    with running(bad, good) as (sb, sg):
        doc["models"][0]["versions"][0]["replicas"] = [sb.url, sg.url]
        with gateway(doc) as (c, app):
            ready(app)
            codes = sorted(_post(c, f"p{i}").status_code for i in range(2))
            assert codes == [200, status]
            assert len(bad.requests) == 1 and len(good.requests) == 1


@pytest.mark.integration
def test_a_hung_replica_does_not_hold_a_non_streaming_request(tmp_path):
    """SIGSTOP: the connection is accepted by the kernel, no header ever comes. With
    first_byte_s = 2 and total_s = 600 the request is answered by the other replica;
    before the fix it waited for total_s (the client's 60 s timeout fails it)."""
    with ExitStack() as stack:
        procs = [FakeProcess(n, tmp_path) for n in ("hung", "live")]
        for p in procs:
            stack.callback(p.close)
        doc = fleet(
            {"v1": [p.url for p in procs]}, balancing={"policy": "round_robin"},
            gateway={"poll_interval_s": 60, "timeouts": {"first_byte_s": 2, "total_s": 600}},
        )  # fmt: skip
        server, app = gateway_thread(doc)
        with server, httpx.Client(base_url=server.url, timeout=60) as c:
            ready(app)
            procs[0].proc.send_signal(signal.SIGSTOP)
            for i in range(4):  # round robin: the hung one is tried at least once
                r = _post(c, f"p{i}")
                assert r.status_code == 200 and "live" in r.json()["id"]
            retried = metric(c, "lmfleet_gateway_retries_total", reason="upstream_timeout")
            assert retried >= 1


def test_early_headers_keep_a_long_non_streaming_answer_within_first_byte_s():
    """A replica that sends its headers at once and a heartbeat while it generates:
    an answer three times longer than first_byte_s is not retried; a late error is
    given the status the replica put in the body."""
    slow = FakeReplica("slow", early_headers=True, delay_s=3.0, poison=POISON)
    doc = fleet({"v1": []}, gateway={"timeouts": {"first_byte_s": 1, "idle_s": 5}})
    with running(slow) as (ss,):
        doc["models"][0]["versions"][0]["replicas"] = [ss.url]
        with gateway(doc) as (c, app):
            ready(app)
            r = _post(c, "long")
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == " w0 w1 w2"
            assert len(slow.requests) == 1
            assert slow.requests[0]["headers"]["x-lmfleet-early-headers"] == "1"
            slow.delay_s = 0.1
            r = _post(c, POISON)
            assert r.status_code == 500
            assert r.json() == {"error": {"message": "slow: failed late", "type": "x",
                                          "param": None, "code": "request_failed"}}  # fmt: skip


def test_a_replica_whose_answer_breaks_off_is_ejected_and_the_request_retried():
    """A replica that sent its early headers and then dropped the connection (it
    died while generating) is out of rotation at once, so neither this request's
    retry nor the next requests spend an attempt on it; its next READY poll would
    bring it back."""
    dying = FakeReplica("dying", early_headers=True, break_unary=True)
    live = FakeReplica("live")
    doc = fleet({"v1": []}, balancing={"policy": "round_robin"},
                gateway={"poll_interval_s": 3600})  # fmt: skip
    with running(dying, live) as (sd, sl):
        doc["models"][0]["versions"][0]["replicas"] = [sd.url, sl.url]
        with gateway(doc) as (c, app):
            ready(app)
            for i in range(4):
                r = _post(c, f"p{i}")
                assert r.status_code == 200 and "live" in r.json()["id"], r.text
            assert len(dying.requests) == 1  # tried once, then never again
            info = app.state.gateway.registry.version("m", "v1").replicas[sd.url]
            assert not info.routable
            assert info.last_error == "its answer broke off (Disconnected)"
            assert metric(c, "lmfleet_gateway_retries_total", reason="upstream_error") == 1


def test_a_hold_past_first_byte_s_without_early_headers_is_tried_elsewhere():
    """The semantics without early headers: no response headers within first_byte_s
    is a hung replica, whatever the request."""
    release = threading.Event()
    slow, fast = FakeReplica("slow", hold=release), FakeReplica("fast")
    doc = fleet({"v1": []}, balancing={"policy": "round_robin"},
                gateway={"timeouts": {"first_byte_s": 2}})  # fmt: skip
    with running(slow, fast) as (ss, sf):
        doc["models"][0]["versions"][0]["replicas"] = [ss.url, sf.url]
        with gateway(doc) as (c, app):
            ready(app)
            try:
                for i in range(2):
                    r = _post(c, f"p{i}")
                    assert r.status_code == 200 and "fast" in r.json()["id"]
            finally:
                release.set()
            tried_slow = len(slow.requests)
            assert tried_slow >= 1
            assert (
                metric(c, "lmfleet_gateway_retries_total", reason="upstream_timeout") == tried_slow
            )


def test_bodies_the_replica_refuses_are_refused_the_same_way():
    a = FakeReplica("a")
    with running(a) as (sa,), gateway(fleet({"v1": [sa.url]})) as (c, app):
        ready(app)
        deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = c.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert "nested too deeply" in r.json()["error"]["message"]
        body = json.dumps({"model": "m", "prompt": "x"}).encode()
        for headers in ({"content-type": "text/plain"}, {}):
            r = c.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 400
            assert r.json()["error"] == {"message": REPLICA_NOT_JSON,
                                         "type": "invalid_request_error", "param": None,
                                         "code": "invalid_json"}  # fmt: skip
        r = c.post("/v1/completions", content=body,
                   headers={"content-type": "application/json; charset=utf-8"})  # fmt: skip
        assert r.status_code == 200
        assert a.requests and len(a.requests) == 1


def test_reload_of_a_file_that_is_not_utf8_is_a_400_and_keeps_the_config(tmp_path):
    a = FakeReplica("a")
    with ServerThread(a.app()) as sa:
        doc = fleet({"v1": [sa.url]})
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        server, app = gateway_thread(doc, config_path=str(path))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            ready(app)
            path.write_bytes(b"models:\n  - name: m\xff\xfe\n")
            r = c.post("/admin/reload")
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_config" and "not UTF-8" in err["message"]
            assert "byte 0xff at offset 19" in err["message"]
            assert _post(c, "still").status_code == 200
