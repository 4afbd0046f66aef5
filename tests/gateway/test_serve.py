"""``lmfleet gateway`` as a process: SIGHUP reloads the fleet file without dropping
an in-flight stream; a broken file keeps the running configuration. Plus the admin
rollout endpoints in-process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from tests.gateway.fakes import FakeReplica, ServerThread, fleet, gateway_thread, wait_for


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version_of(c: httpx.Client) -> str:
    return c.post("/v1/completions", json={"model": "m", "prompt": "x"}).headers[
        "x-lmfleet-version"
    ]


@pytest.mark.integration
def test_sighup_reloads_without_dropping_a_stream(tmp_path):
    a, b = FakeReplica("a", gap_s=0.03), FakeReplica("b")
    with ServerThread(a.app()) as sa, ServerThread(b.app()) as sb:
        doc = fleet({"v1": [sa.url], "v2": [sb.url]})
        doc["models"][0]["versions"][1]["weight"] = 0
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        port = _port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmfleet.cli", "gateway", "--config", str(path),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c, \
                    ThreadPoolExecutor(1) as pool:  # fmt: skip

                def up() -> bool:
                    try:
                        return c.get("/health/ready").status_code == 200
                    except httpx.HTTPError:
                        return False

                wait_for(up, 30)
                assert _version_of(c) == "v1"

                def stream() -> str:
                    with c.stream("POST", "/v1/completions", json={
                        "model": "m", "prompt": "x", "max_tokens": 40, "stream": True,
                    }) as r:  # fmt: skip
                        return "".join(
                            json.loads(line[6:])["choices"][0]["text"]
                            for line in r.iter_lines() if line.startswith("data: {")
                        )  # fmt: skip

                fut = pool.submit(stream)
                wait_for(lambda: any(r["body"].get("stream") for r in a.requests))
                doc["models"][0]["versions"][0]["weight"] = 0
                doc["models"][0]["versions"][1]["weight"] = 1
                path.write_text(yaml.safe_dump(doc))
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: _version_of(c) == "v2", 10)
                assert fut.result(timeout=20) == "".join(f" w{i}" for i in range(40))
                # a broken file: logged, the running configuration stays
                path.write_text("models: [{name: m, versions: [{name: v1, weight: -3}]}]")
                proc.send_signal(signal.SIGHUP)
                time.sleep(0.5)
                assert _version_of(c) == "v2"
                assert proc.poll() is None
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
        text = err.decode()
        assert "SIGHUP: reloaded" in text
        assert "models[0].versions[0].weight: must be ≥ 0" in text


def test_rollout_admin_api_advances_and_rolls_back():
    a, b = FakeReplica("a"), FakeReplica("b")
    with ServerThread(a.app()) as sa, ServerThread(b.app()) as sb:
        doc = fleet({"v1": [sa.url], "v2": [sb.url]}, rollout={
            "baseline": "v1", "candidate": "v2", "min_samples_for_judgement": 1,
            "steps": [{"weight": 10, "min_requests": 0, "min_duration_s": 0},
                      {"weight": 100, "min_requests": 0, "min_duration_s": 0}],
        })  # fmt: skip
        server, app = gateway_thread(doc)
        with server, httpx.Client(base_url=server.url, timeout=20) as c:
            wait_for(lambda: all(v.routable() for v in app.state.gateway.registry.all_versions()))
            assert c.get("/admin/rollouts/m").status_code == 404
            r = c.post("/admin/rollouts/m")
            assert r.status_code == 200, r.text
            assert r.json()["candidate_weight"] == 10
            weights = c.get("/admin/replicas").json()["m"]
            assert (weights["v1"]["weight"], weights["v2"]["weight"]) == (90, 10)
            for v in ("v1", "v2"):  # samples for both sides, so the SLOs can be judged
                for _ in range(2):
                    c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True},
                           headers={"x-lmfleet-version": v})  # fmt: skip
            runner = app.state.rollouts
            runner.evaluate_once()
            status = c.get("/admin/rollouts/m").json()
            assert status["step_index"] == 1 or status["status"] != "running", status
            r = c.post("/admin/rollouts/m/rollback", json={"reason": "test"})
            assert r.status_code == 200
            final = r.json()
            if final["status"] == "rolled_back":
                assert c.get("/admin/replicas").json()["m"]["v2"]["weight"] == 0
            assert final["history"]
            ab = c.get("/admin/ab/m").json()
            assert ab["baseline"] == "v1" and "v2" in ab["comparisons"]
