"""API keys (401), per-key request and token limits (429 + Retry-After), the admin
token; token buckets on a fake clock."""

from __future__ import annotations

import httpx
import pytest

from lmfleet.fleet.config import parse_config
from lmfleet.gateway.auth import Authenticator, TokenBucket
from lmfleet.gateway.errors import GatewayError
from tests.gateway.fakes import FakeReplica, ServerThread, fleet, gateway_thread, wait_for


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _config(**gateway):
    doc = fleet({"v1": ["http://127.0.0.1:9"]}, gateway=gateway)
    doc["api_keys"] = [
        {"name": "a", "key": "ka", "rpm": 2},
        {"name": "b", "key": "kb", "tpm": 100},
    ]
    return parse_config(doc)


def test_token_bucket_refills_continuously():
    clock = Clock()
    bucket = TokenBucket(60, clock)
    bucket.take(60)
    assert bucket.wait_s(1) == pytest.approx(1.0)
    clock.t = 0.5
    assert bucket.level() == pytest.approx(0.5)
    clock.t = 1000
    assert bucket.level() == 60  # never above capacity


def test_keys_and_rpm():
    clock = Clock()
    auth = Authenticator(_config(), clock)
    with pytest.raises(GatewayError) as e:
        auth.authenticate({})
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(GatewayError) as e:
        auth.authenticate({"authorization": "Bearer nope"})
    assert e.value.status == 401
    assert auth.authenticate({"authorization": "Bearer ka"}).name == "a"
    auth.authenticate({"authorization": "Bearer ka"})
    with pytest.raises(GatewayError) as e:
        auth.authenticate({"authorization": "Bearer ka"})
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "30"
    clock.t = 30
    auth.authenticate({"authorization": "Bearer ka"})


def test_tpm_is_charged_after_the_answer():
    clock = Clock()
    auth = Authenticator(_config(), clock)
    key = auth.authenticate({"authorization": "Bearer kb"})
    key.record_tokens(150)  # an overdraft of 50 tokens
    with pytest.raises(GatewayError) as e:
        auth.authenticate({"authorization": "Bearer kb"})
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "30"
    clock.t = 31
    auth.authenticate({"authorization": "Bearer kb"})


def test_buckets_survive_a_reload():
    clock = Clock()
    cfg = _config()
    auth = Authenticator(cfg, clock)
    for _ in range(2):
        auth.authenticate({"authorization": "Bearer ka"})
    auth.apply_config(cfg)
    with pytest.raises(GatewayError):
        auth.authenticate({"authorization": "Bearer ka"})


def test_admin_token_rules():
    auth = Authenticator(_config(admin_token="adm"))
    auth.check_admin({"authorization": "Bearer adm"})
    for headers in ({}, {"authorization": "Bearer ka"}):
        with pytest.raises(GatewayError) as e:
            auth.check_admin(headers)
        assert e.value.status == 401
    with pytest.raises(GatewayError) as e:
        Authenticator(_config()).check_admin({"authorization": "Bearer ka"})
    assert e.value.status == 403  # keys but no admin token: the admin API is off
    open_cfg = parse_config(fleet({"v1": []}))
    Authenticator(open_cfg).check_admin({})  # local setup: open


def test_auth_over_http_in_openai_format():
    fake = FakeReplica("a")
    with ServerThread(fake.app()) as sa:
        doc = fleet({"v1": [sa.url]}, gateway={"admin_token": "adm"})
        doc["api_keys"] = [{"name": "a", "key": "ka", "rpm": 1}]
        server, app = gateway_thread(doc)
        with server, httpx.Client(base_url=server.url) as c:
            reg = app.state.gateway.registry
            wait_for(lambda: reg.version("m", "v1").routable())
            body = {"model": "m", "prompt": "x"}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            ok = c.post("/v1/completions", json=body, headers={"authorization": "Bearer ka"})
            assert ok.status_code == 200
            r = c.post("/v1/completions", json=body, headers={"authorization": "Bearer ka"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert c.get("/admin/config").status_code == 401
            cfg = c.get("/admin/config", headers={"authorization": "Bearer adm"}).json()
            assert cfg["config"]["api_keys"][0]["key"] == "***"
            assert cfg["config"]["gateway"]["admin_token"] == "***"


def test_replicas_get_their_own_key_never_the_clients():
    fake = FakeReplica("a")
    with ServerThread(fake.app()) as sa:
        doc = fleet({"v1": [sa.url]}, gateway={"admin_token": "adm"})
        doc["models"][0]["versions"][0]["api_key"] = "replica-key"
        doc["api_keys"] = [{"name": "a", "key": "client-key"}]
        server, app = gateway_thread(doc)
        with server, httpx.Client(base_url=server.url) as c:
            reg = app.state.gateway.registry
            wait_for(lambda: reg.version("m", "v1").routable())
            for stream in (False, True):
                r = c.post(
                    "/v1/completions", json={"model": "m", "prompt": "x", "stream": stream},
                    headers={"authorization": "Bearer client-key"},
                )  # fmt: skip
                assert r.status_code == 200
            assert [q["headers"].get("authorization") for q in fake.requests] == [
                "Bearer replica-key"
            ] * 2
            admin = {"authorization": "Bearer adm"}
            cfg = c.get("/admin/config", headers=admin).json()["config"]
            assert cfg["models"][0]["versions"][0]["api_key"] == "***"
