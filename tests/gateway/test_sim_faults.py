"""Faults of real replica processes (``lmfleet serve sim:... --fault-injection``)
behind the gateway: a poisoned request among three replicas kills the engine
serving it (or fails alone) and the others keep serving; a SIGSTOPped replica does
not hold a non-streaming request past ``first_byte_s``."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.fakes import gateway_thread, wait_for
from tests.gateway.sim_replicas import MODEL, REPLICA_KEY, SimReplica, sim_replicas

pytestmark = pytest.mark.integration


@pytest.fixture
def replicas(tmp_path) -> Iterator[list[SimReplica]]:
    # a dead engine's process stays up for the test (its /state says engine_dead)
    with sim_replicas(tmp_path, 3, "--fault-injection", "--exit-on-engine-dead-after", "600") as r:
        yield r


def _fleet(urls: list[str], policy: str = "least_outstanding", **gateway: object) -> dict:
    return {
        "gateway": {"poll_interval_s": 0.1, **gateway},
        "models": [{"name": "m", "balancing": {"policy": policy}, "versions": [{"name": "v1", "served_model_name": MODEL,
                    "replicas": urls, "api_key": REPLICA_KEY}]}],
    }  # fmt: skip


def _state(r: SimReplica) -> dict:
    return httpx.get(r.url + "/state", timeout=5).json()


def _serves(c: httpx.Client, n: int) -> list[int]:
    codes = []
    for i in range(n):
        body = {"model": "m", "prompt": f"after {i}", "max_tokens": 4, "stream": i % 2 == 1}
        r = c.post("/v1/completions", json=body)
        codes.append(r.status_code)
    return codes


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_kills_its_engine_takes_down_one_replica_only(replicas, stream):
    server, app = gateway_thread(_fleet([r.url for r in replicas]))
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        reg = app.state.gateway.registry
        wait_for(lambda: len(reg.version("m", "v1").routable()) == 3, 30)
        body = {"model": "m", "prompt": "poison", "max_tokens": 8, "stream": stream,
                "request_id": "lmfleet-fault-step-after-2"}  # fmt: skip
        r = c.post("/v1/completions", json=body)
        if stream:  # the stream had started: it ends with the replica's error event
            assert r.status_code == 200
            events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            assert events[-1]["error"]["code"] == "engine_dead"
        else:
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "replica_failed"
        dead = [rep for rep in replicas if _state(rep)["engine_dead"]]
        assert len(dead) == 1  # the request went to one replica, and only one
        info = reg.version("m", "v1").replicas[dead[0].url]
        assert not info.routable and info.state == "engine_dead"
        assert _serves(c, 20) == [200] * 20
        assert sum(1 for rep in replicas if not _state(rep)["engine_dead"]) == 2


def test_a_request_that_fails_alone_leaves_every_replica_serving(replicas):
    server, app = gateway_thread(_fleet([r.url for r in replicas]))
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        reg = app.state.gateway.registry
        wait_for(lambda: len(reg.version("m", "v1").routable()) == 3, 30)
        body = {"model": "m", "prompt": "poison", "max_tokens": 8,
                "request_id": "lmfleet-fault-sample"}  # fmt: skip
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed"
        assert _serves(c, 20) == [200] * 20
        assert len(reg.version("m", "v1").routable()) == 3
        assert not any(_state(rep)["engine_dead"] for rep in replicas)


def test_a_stopped_replica_does_not_hold_a_non_streaming_request(replicas):
    """Before, the request waited for total_s (600 s); the client's 60 s timeout
    would fail this test. Polls are off after the first, so only first_byte_s acts."""
    server, app = gateway_thread(_fleet(
        [r.url for r in replicas], "round_robin", poll_interval_s=60,
        timeouts={"first_byte_s": 2, "total_s": 600},
    ))  # fmt: skip
    stopped = replicas[0]
    with server, httpx.Client(base_url=server.url, timeout=60) as c:
        reg = app.state.gateway.registry
        wait_for(lambda: len(reg.version("m", "v1").routable()) == 3, 30)
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        try:
            codes = [c.post("/v1/completions", json={"model": "m", "prompt": f"p{i}",
                                                     "max_tokens": 4}).status_code
                     for i in range(6)]  # round robin: the stopped one is tried  # fmt: skip
            timeouts = [
                line for line in c.get("/metrics").text.splitlines()
                if line.startswith("lmfleet_gateway_retries_total{")
                and 'reason="upstream_timeout"' in line
            ]  # fmt: skip
        finally:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        assert codes == [200] * 6
        assert timeouts and float(timeouts[0].rsplit(" ", 1)[1]) >= 1


def _stream(c: httpx.Client, prompt: str, n: int) -> str:
    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    text = []
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
    return "".join(text)


def test_streams_resume_past_a_second_dead_replica(tmp_path):
    """Two of three replicas SIGKILLed at once under streams: a resume that first
    picks the other dead replica (not ejected yet) goes on to the live one."""
    import concurrent.futures

    with sim_replicas(tmp_path, 3) as replicas:
        server, app = gateway_thread(_fleet([r.url for r in replicas], "round_robin"))
        with server, httpx.Client(base_url=server.url, timeout=120) as c:
            reg = app.state.gateway.registry
            wait_for(lambda: len(reg.version("m", "v1").routable()) == 3, 30)
            prompts = [f"two die {i}" for i in range(9)]
            reference = [_stream(c, p, 200) for p in prompts]
            with concurrent.futures.ThreadPoolExecutor(9) as pool:
                futures = [pool.submit(_stream, c, p, 200) for p in prompts]
                wait_for(lambda: all(_state(r)["running"] for r in replicas), 30)
                for r in replicas[:2]:
                    r.kill()
                assert [f.result() for f in futures] == reference


def test_a_retry_waits_for_a_replica_when_all_failed_at_once(tmp_path):
    """Every replica gone while a non-streaming request is in flight: its retry
    waits (up to first_byte_s) and succeeds on the replica started meanwhile,
    instead of an immediate 502."""
    import concurrent.futures

    profiles = tmp_path / "profiles.json"
    with sim_replicas(tmp_path, 1) as (first,):
        server, app = gateway_thread(_fleet([first.url], timeouts={"first_byte_s": 60}))
        with server, httpx.Client(base_url=server.url, timeout=120) as c:
            reg = app.state.gateway.registry
            wait_for(lambda: len(reg.version("m", "v1").routable()) == 1, 30)
            body = {"model": "m", "prompt": "outlive", "max_tokens": 400, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                future = pool.submit(c.post, "/v1/completions", json=body)
                wait_for(lambda: _state(first)["running"] == 1, 30)
                first.kill()
                env = {**os.environ, "LMFLEET_SIM_PROFILES": str(profiles)}
                second = SimReplica(tmp_path, env, "second")
                try:
                    second.wait_ready()
                    reg.add_replica("m", "v1", second.url)
                    r = future.result()
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["completion_tokens"] == 400
                finally:
                    second.close()
