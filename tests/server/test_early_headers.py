"""Early headers for non-streaming answers (docs/gateway.md, "Non-streaming answers and
first_byte_s"), against real replicas: the app under uvicorn in a thread, serving the
simulated accelerator (``sim:llama-50m-cpu``: 30 ms steps, sped up by
``sim_time_scale``), alone and behind the real gateway."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lmfleet.errors import ConfigError
from lmfleet.gateway.answers import late_status
from lmfleet.server.app import build_app
from lmfleet.server.early_headers import EARLY_HEADERS, KEEPALIVE_S
from lmfleet.server.replica import Replica
from lmfleet.server.settings import ServerSettings
from tests.gateway.fakes import gateway_thread, metric
from tests.server_thread import ServerThread

MODEL = "sim:llama-50m-cpu"
EARLY = {EARLY_HEADERS: "1"}
#: 30 ms steps at 3 × speed: 10 ms per token
SCALE = 3.0
#: a request of this many tokens runs for a minute at SCALE: it is still generating
#: whenever a test looks, and is ended by the test (disconnect, drain)
ENDLESS = 3900


def _wait(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def replica_server(**overrides: Any) -> Iterator[tuple[httpx.Client, Replica]]:
    values: dict[str, Any] = {
        "model": MODEL, "served_model_names": ("m",), "progress": False,
        "sim_time_scale": SCALE, "fault_injection": True,
        "early_headers_keepalive_s": 0.05, "exit_on_engine_dead_after_s": 600,
    }  # fmt: skip
    values.update(overrides)
    app = build_app(ServerSettings(**values))
    with (
        ServerThread(app, lifespan="on") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        _wait(lambda: client.get("/health/ready").status_code == 200, what="replica ready")
        yield client, app.state.replica


@pytest.fixture(scope="module")
def replica() -> Iterator[tuple[httpx.Client, Replica]]:
    with replica_server() as r:
        yield r


def _completion(prompt: Any = "hello there", max_tokens: int = 12, **extra: Any) -> dict:
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}  # fmt: skip


def _chat(max_tokens: int = 12, **extra: Any) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}  # fmt: skip


def _idle(rep: Replica) -> bool:
    s = rep.stats()
    return (
        rep.in_flight_requests == 0 and s is not None and s.num_running == 0
        and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks
    )  # fmt: skip


def _early_headers(r: httpx.Response) -> None:
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers[EARLY_HEADERS] == "1"
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers


def _read_spaces(r: httpx.Response, count: int) -> Iterator[bytes]:
    """Read the body until ``count`` bytes came, which must all be spaces; the rest of
    the body is left in the iterator returned (dropping it closes the connection)."""
    got = b""
    chunks = r.iter_raw()
    while len(got) < count:
        got += next(chunks)
    assert got == b" " * len(got), got[:200]
    return chunks


def test_the_default_period_is_the_contracts():
    assert KEEPALIVE_S == 5.0
    assert ServerSettings(model=MODEL).early_headers_keepalive_s == KEEPALIVE_S
    with pytest.raises(ConfigError, match="early_headers_keepalive_s"):
        ServerSettings(model=MODEL, early_headers_keepalive_s=6.0)


@pytest.mark.parametrize("n", [1, 2])
def test_headers_come_at_once_then_spaces_and_a_disconnect_aborts(replica, n):
    client, rep = replica
    body = _completion(max_tokens=ENDLESS, n=n)
    with client.stream("POST", "/v1/completions", json=body, headers=EARLY) as r:
        _early_headers(r)
        assert r.headers["x-request-id"].startswith("cmpl-")
        rest = _read_spaces(r, 5)  # keep-alive bytes, every 50 ms here
        # the answer is not complete: its engine requests are still generating
        assert rep.in_flight_requests == 1
        _wait(lambda: rep.stats().num_running == n, what=f"{n} requests running")
        assert not r.is_closed
        rest.close()  # closes the connection, mid-answer
    # the engine requests are aborted, their blocks freed
    _wait(lambda: _idle(rep), what="engine idle after the disconnect")


CASES = {
    "completion": ("/v1/completions", _completion()),
    "completion n=2 echo, two prompts": (
        "/v1/completions", _completion(["one", "two"], n=2, best_of=2, echo=True, seed=7),
    ),
    "completion logprobs": ("/v1/completions", _completion(logprobs=2, max_tokens=30)),
    "chat": ("/v1/chat/completions", _chat(max_tokens=30)),
    "chat n=3 logprobs": ("/v1/chat/completions", _chat(n=3, logprobs=True, top_logprobs=2)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_answer_is_the_one_without_the_header(replica, case):
    client, _ = replica
    path, body = CASES[case]
    plain = client.post(path, json=body)
    assert plain.status_code == 200, plain.text
    assert EARLY_HEADERS not in plain.headers  # without the header nothing changes
    assert int(plain.headers["content-length"]) == len(plain.content)
    early = client.post(path, json=body, headers={**EARLY, "x-request-id": "trace-7"})
    _early_headers(early)
    assert early.headers["x-request-id"] == "trace-7"
    raw = early.content
    assert raw.lstrip(b" ") == raw.strip() and raw.rstrip() == raw  # spaces first, then JSON
    got, want = json.loads(raw), plain.json()
    for answer in (got, want):
        del answer["id"], answer["created"]
    assert got == want
    assert got["choices"] and all(c["finish_reason"] == "length" for c in got["choices"])


def test_spaces_come_while_a_long_answer_generates(replica):
    client, _ = replica
    r = client.post("/v1/completions", json=_completion(max_tokens=60), headers=EARLY)
    _early_headers(r)
    spaces = len(r.content) - len(r.content.lstrip(b" "))
    assert spaces >= 1  # 60 tokens of 10 ms, a space every 50 ms
    assert json.loads(r.content)["usage"]["completion_tokens"] == 60


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", _completion(max_tokens=20, request_id="lmfleet-fault-output-after-3")),
        ("/v1/completions", _completion(n=2, request_id="lmfleet-fault-sample")),
        ("/v1/chat/completions", _chat(request_id="lmfleet-fault-sample-after-4")),
    ],
)
def test_a_failure_after_the_headers_is_the_error_with_its_status(replica, path, body):
    client, rep = replica
    plain = client.post(path, json=body)
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "request_failed"
    early = client.post(path, json=body, headers=EARLY)
    _early_headers(early)
    assert json.loads(early.content) == {"error": plain.json()["error"], "status": 500}
    status, content = late_status(early.content)  # what the gateway reads from it
    assert status == 500 and json.loads(content) == plain.json()
    _wait(lambda: _idle(rep), what="engine idle")


@pytest.mark.parametrize("n", [1, 2])
def test_refusals_before_generation_are_plain_answers(replica, n):
    client, _ = replica
    # the engine's own check when the request is added: plain 400 naming the field
    r = client.post("/v1/completions", json=_completion(max_tokens=5000, n=n), headers=EARLY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert EARLY_HEADERS not in r.headers
    r = client.post("/v1/chat/completions", json=_chat(top_logprobs=2), headers=EARLY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = client.post("/v1/completions", json={**_completion(), "model": "other"}, headers=EARLY)
    assert r.status_code == 404 and EARLY_HEADERS not in r.headers


def test_admission_refusals_are_plain_answers():
    with replica_server(max_concurrent_requests=1) as (client, rep):
        long = _completion(max_tokens=ENDLESS)
        with client.stream("POST", "/v1/completions", json=long, headers=EARLY) as first:
            _early_headers(first)
            r = client.post("/v1/completions", json=_completion(), headers=EARLY)
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
            assert r.headers["x-lmfleet-admitted"] == "0" and EARLY_HEADERS not in r.headers
        _wait(lambda: _idle(rep), what="engine idle after the disconnect")
        assert client.post("/v1/completions", json=_completion(), headers=EARLY).status_code == 200


def test_a_draining_replica_refuses_plainly_and_a_request_it_cuts_short_gets_503():
    with replica_server() as (client, rep):
        long = _completion(max_tokens=ENDLESS)
        with client.stream("POST", "/v1/completions", json=long, headers=EARLY) as running:
            _early_headers(running)
            rest = _read_spaces(running, 1)
            assert client.post("/admin/drain?timeout=0.2").status_code == 202
            r = client.post("/v1/completions", json=_completion(), headers=EARLY)
            assert r.status_code == 503 and r.headers["x-lmfleet-admitted"] == "0"
            assert r.json()["error"]["code"] in ("draining", "stopped")
            assert EARLY_HEADERS not in r.headers
            body = b"".join(rest)  # the drain deadline aborts it
        late = json.loads(body)
        assert late["status"] == 503 and late["error"]["code"] == "aborted"
        _wait(lambda: rep.state.value == "stopped", what="replica stopped")


# ---- behind the gateway -----------------------------------------------------------------------
def _fleet(url: str, **timeouts: float) -> dict:
    return {
        "gateway": {"poll_interval_s": 0.05, "timeouts": timeouts},
        "models": [{"name": "m", "versions": [{"name": "v1", "weight": 1, "replicas": [url]}]}],
    }


@contextlib.contextmanager
def _behind_gateway(
    **replica: Any,
) -> Iterator[tuple[httpx.Client, httpx.Client, Replica, Any]]:
    """(gateway client, replica client, replica, gateway app): one replica, early
    headers after 1 s of silence would be too late (``first_byte_s`` 1)."""
    with replica_server(**replica) as (direct, rep):
        url = str(direct.base_url).rstrip("/")
        server, app = gateway_thread(_fleet(url, first_byte_s=1, idle_s=5))
        with server, httpx.Client(base_url=server.url, timeout=60) as c:
            reg = app.state.gateway.registry
            _wait(lambda: len(reg.version("m", "v1").routable()) == 1, what="gateway ready")
            yield c, direct, rep, app


def test_a_non_streaming_answer_longer_than_first_byte_s_succeeds_through_the_gateway():
    # 30 ms steps (no speed-up): 70 tokens take at least 2.1 s, twice first_byte_s
    with _behind_gateway(sim_time_scale=1.0, early_headers_keepalive_s=0.5) as (c, direct, _, _):
        body = _completion(max_tokens=70)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert "content-length" in r.headers and EARLY_HEADERS not in r.headers
        want = direct.post("/v1/completions", json=body).json()
        assert r.json()["choices"] == want["choices"] and r.json()["usage"] == want["usage"]
        assert metric(c, "lmfleet_gateway_retries_total") == 0
        r = c.post("/v1/chat/completions", json=_chat(max_tokens=50))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 50


def test_the_gateway_gives_a_late_error_its_status():
    with _behind_gateway() as (c, direct, rep, app):
        body = _completion(max_tokens=20, request_id="lmfleet-fault-output-after-5")
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        assert r.json() == direct.post("/v1/completions", json=body).json()
        assert len(app.state.gateway.registry.version("m", "v1").routable()) == 1
        # the engine dies after two tokens: the replica says engine_dead late, the
        # gateway marks it dead and does not send the request on
        body = _completion(max_tokens=20, request_id="lmfleet-fault-step-after-2")
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "replica_failed"
        assert "engine_dead" in r.json()["error"]["message"]
        info = next(iter(app.state.gateway.registry.version("m", "v1").replicas.values()))
        assert info.state == "engine_dead" and not info.routable
        assert rep.engine_dead
