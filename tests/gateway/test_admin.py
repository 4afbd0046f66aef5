"""The admin API and what it owns: validated replicas and weights, replicas removed
by id, who owns a weight (a running rollout, then the operator, then the file),
rollout state across a restart, what feeds a rollout's window, feedback rules."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import yaml

from lmfleet.fleet.config import parse_config
from lmfleet.gateway.rollout_runner import RolloutRunner, plan_from_config
from lmfleet.gateway.state import GatewayState
from tests.gateway.fakes import FakeReplica, fleet, gateway_thread, ready, running

HOLDING_PLAN = {
    "baseline": "v1", "candidate": "v2", "min_samples_for_judgement": 1,
    "steps": [{"weight": 10, "min_requests": 1_000_000, "min_duration_s": 0},
              {"weight": 100, "min_requests": 0, "min_duration_s": 0}],
}  # fmt: skip
JSON = {"content-type": "application/json"}


def _weights(c: httpx.Client) -> tuple[float, float]:
    m = c.get("/admin/replicas").json()["m"]
    return m["v1"]["weight"], m["v2"]["weight"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "give the replica's base URL"),
        ("not a url", "must start with http:// or https://"),
        ("ftp://h:21", "must start with http:// or https://"),
        ("http://h:99999", "a port is 1..65535"),
        ("http://h:0", "port 0"),
        ("http://:8000", "has no host"),
        (5, "give the replica's base URL"),
    ],
)
def test_adding_a_replica_validates_the_url(url, message):
    a = FakeReplica("a")
    with running(a) as (sa,):
        server, app = gateway_thread(fleet({"v1": [sa.url]}))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            r = c.post("/admin/models/m/versions/v1/replicas", json={"url": url})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "url" and message in err["message"]
            assert len(app.state.gateway.registry.version("m", "v1").replicas) == 1


def test_replicas_are_removed_by_id_and_the_body_form_still_works():
    a = FakeReplica("a")
    with running(a) as (sa,):
        server, app = gateway_thread(fleet({"v1": [sa.url]}))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            added = c.post("/admin/models/m/versions/v1/replicas",
                           json={"url": "http://10.0.0.9:8000/"}).json()  # fmt: skip
            assert added["url"] == "http://10.0.0.9:8000" and added["id"].startswith("r")
            listed = c.get("/admin/replicas").json()["m"]["v1"]["replicas"]
            assert {x["id"] for x in listed} == {added["id"], listed[0]["id"]}
            r = c.delete(f"/admin/models/m/versions/v1/replicas/{added['id']}")
            assert r.status_code == 200 and r.json()["removed"] == "http://10.0.0.9:8000"
            assert (
                c.delete(f"/admin/models/m/versions/v1/replicas/{added['id']}").status_code == 404
            )
            # the old form, URL in the body: deprecated, still served
            c.post("/admin/models/m/versions/v1/replicas", json={"url": "http://10.0.0.9:8000"})
            r = c.request("DELETE", "/admin/models/m/versions/v1/replicas",
                          json={"url": "http://10.0.0.9:8000"})  # fmt: skip
            assert r.status_code == 200 and r.headers["deprecation"] == "true"
            assert len(app.state.gateway.registry.version("m", "v1").replicas) == 1


@pytest.mark.parametrize("raw", [b'{"weight": Infinity}', b'{"weight": NaN}',
                                 b'{"weight": "1"}', b'{"weight": -1}', b'{"weight": true}'])  # fmt: skip
def test_weights_must_be_finite_numbers_at_least_0(raw):
    a = FakeReplica("a")
    with running(a) as (sa,):
        server, app = gateway_thread(fleet({"v1": [sa.url]}))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            r = c.patch("/admin/models/m/versions/v1", content=raw, headers=JSON)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "weight"
            assert app.state.gateway.registry.version("m", "v1").weight == 1


def test_a_running_rollout_owns_the_weights_and_a_rolled_back_one_survives_reload(tmp_path):
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb):
        doc = fleet({"v1": [sa.url], "v2": [sb.url]}, rollout=HOLDING_PLAN)
        doc["models"][0]["versions"][1]["weight"] = 30
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        server, app = gateway_thread(doc, config_path=str(path))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            ready(app)
            assert c.post("/admin/rollouts/m").status_code == 200
            assert _weights(c) == (90, 10)
            r = c.patch("/admin/models/m/versions/v2", json={"weight": 50})
            assert r.status_code == 409 and r.json()["error"]["code"] == "rollout_running"
            assert "rollout of 'm' (v1 → v2, step 0 at 10 %)" in r.json()["error"]["message"]
            assert c.post("/admin/rollouts/m").status_code == 409  # one at a time
            assert c.post("/admin/reload").status_code == 200
            assert _weights(c) == (90, 10)  # the running rollout's, not the file's 1 / 30
            c.post("/admin/rollouts/m/rollback", json={"reason": "test"})
            assert _weights(c) == (100, 0)
            assert c.post("/admin/reload").status_code == 200
            assert _weights(c) == (100, 0)  # the file's weights are unchanged: still 0
            assert c.get("/admin/rollouts/m").json()["status"] == "rolled_back"
            # an operator changes the file's weight of v2: the file wins for v2
            doc["models"][0]["versions"][1]["weight"] = 5
            path.write_text(yaml.safe_dump(doc))
            assert c.post("/admin/reload").status_code == 200
            assert _weights(c) == (100, 5)
            # and the operator's PATCH, now that no rollout runs
            assert c.patch("/admin/models/m/versions/v1", json={"weight": 7}).status_code == 200
            assert c.post("/admin/reload").status_code == 200
            assert _weights(c) == (7, 5)


def test_rollout_state_and_weights_survive_a_restart(tmp_path):
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb):
        doc = fleet({"v1": [sa.url], "v2": [sb.url]}, rollout={**HOLDING_PLAN, "start": True})
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        server, _ = gateway_thread(doc, config_path=str(path))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            assert c.get("/admin/rollouts/m").json()["status"] == "running"
            assert _weights(c) == (90, 10)
        saved = json.loads((tmp_path / "fleet.yaml.state.json").read_text())
        assert saved["rollouts"]["m"]["status"] == "running"
        # restarted: the rollout goes on at its step (start: true does not restart it)
        server, _ = gateway_thread(doc, config_path=str(path))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            status = c.get("/admin/rollouts/m").json()
            assert (status["status"], status["step_index"]) == ("running", 0)
            assert status["history"] == []
            assert _weights(c) == (90, 10)
            c.post("/admin/rollouts/m/rollback", json={"reason": "bad outputs"})
        server, _ = gateway_thread(doc, config_path=str(path))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            status = c.get("/admin/rollouts/m").json()
            assert status["status"] == "rolled_back"
            assert status["history"][-1]["reason"] == "manual: bad outputs"
            assert _weights(c) == (100, 0)


def test_only_split_requests_feed_the_rollout_window_and_unary_ones_carry_latency():
    a, b = FakeReplica("a"), FakeReplica("b")
    with running(a, b) as (sa, sb):
        doc = fleet({"v1": [sa.url], "v2": [sb.url]}, rollout=HOLDING_PLAN,
                    shadow={"version": "v2", "percent": 100})  # fmt: skip
        server, app = gateway_thread(doc)
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            ready(app)
            assert c.post("/admin/rollouts/m").status_code == 200
            window = app.state.gateway.windows["m"]
            for v in ("v1", "v2"):
                c.post("/v1/completions", json={"model": "m", "prompt": "x"},
                       headers={"x-lmfleet-version": v})  # fmt: skip
            assert (window.baseline.total, window.candidate.total) == (0, 0)
            for i in range(20):
                c.post("/v1/completions", json={"model": "m", "prompt": f"{i}", "max_tokens": 4})
            # 20 split requests; their shadow copies to v2 are not counted
            assert window.baseline.total + window.candidate.total == 20
            side = window.baseline
            assert len(side.values("e2e")) == side.total and len(side.values("tpot")) == side.total
            assert not side.values("ttft")  # unary: no first token to time


@pytest.mark.parametrize("raw", [b'{"id": "%s", "score": NaN}', b'{"id": "%s", "score": Infinity}',
                                 b'{"id": "%s", "score": "1"}', b'{"id": "%s", "score": true}'])  # fmt: skip
def test_feedback_scores_are_finite_numbers(raw):
    a = FakeReplica("a")
    with running(a) as (sa,):
        server, app = gateway_thread(fleet({"v1": [sa.url]}))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            ready(app)
            rid = c.post("/v1/completions", json={"model": "m", "prompt": "x"}).json()["id"]
            r = c.post("/v1/feedback", content=raw.replace(b"%s", rid.encode()), headers=JSON)
            assert r.status_code == 400 and r.json()["error"]["param"] == "score", r.text


def test_one_feedback_score_per_response_the_first_stands():
    a = FakeReplica("a")
    with running(a) as (sa,):
        server, app = gateway_thread(fleet({"v1": [sa.url]}))
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            ready(app)
            rid = c.post("/v1/completions", json={"model": "m", "prompt": "x"}).json()["id"]
            assert c.post("/v1/feedback", json={"id": rid, "score": 1}).status_code == 200
            r = c.post("/v1/feedback", json={"id": rid, "score": 0})
            assert r.status_code == 409 and r.json()["error"]["code"] == "feedback_exists"
            report = c.get("/admin/ab/m").json()["versions"]["v1"]["feedback"]
            assert (report["n"], report["mean"]) == (1, 1.0)


def test_a_hold_is_logged_when_what_it_waits_for_changes_not_every_second(caplog):
    state = GatewayState(parse_config(fleet({"v1": [], "v2": []}, rollout=HOLDING_PLAN)))
    runner = RolloutRunner(state)
    runner.start_rollout("m", plan_from_config(state.config.models[0].rollout))
    with caplog.at_level(logging.INFO, logger="lmfleet.gateway.rollout_runner"):
        for _ in range(10):
            runner.evaluate_once()
        window = state.windows["m"]
        window.baseline.record(e2e=1.0)
        window.candidate.record(e2e=1.0)  # the samples gate is met: a new reason
        for _ in range(10):
            runner.evaluate_once()
    holds = [r.getMessage() for r in caplog.records if ": hold at step" in r.getMessage()]
    assert len(holds) == 2, holds
    assert "requests on each version" in holds[0] and "requests on each" not in holds[1]
