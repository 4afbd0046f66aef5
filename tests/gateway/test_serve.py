"""``lmfleet gateway`` as a process: ``--port 0`` reports the bound port, SIGHUP
reloads the fleet file without dropping an in-flight stream, a broken or non-UTF-8
file keeps the running configuration and logs one line. Plus the admin rollout
endpoints in-process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.gateway.fakes import FakeReplica, ServerThread, fleet, gateway_thread, wait_for


def _version_of(c: httpx.Client) -> str:
    return c.post("/v1/completions", json={"model": "m", "prompt": "x"}).headers[
        "x-lmfleet-version"
    ]


def _log_has(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


@pytest.mark.integration
def test_sighup_reloads_without_dropping_a_stream(tmp_path):
    a, b = FakeReplica("a", gap_s=0.03), FakeReplica("b")
    with ServerThread(a.app()) as sa, ServerThread(b.app()) as sb:
        doc = fleet({"v1": [sa.url], "v2": [sb.url]})
        doc["models"][0]["versions"][1]["weight"] = 0
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc))
        port_file, log = tmp_path / "gateway.port", tmp_path / "gateway.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lmfleet.cli", "gateway", "--config", str(path),
                 "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)],
                stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        try:
            wait_for(lambda: port_file.exists() or proc.poll() is not None, 30)
            port = int(port_file.read_text())
            assert proc.stdout is not None
            assert proc.stdout.readline().decode().strip() == (
                f"lmfleet gateway: listening on http://127.0.0.1:{port}"
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c, \
                    ThreadPoolExecutor(1) as pool:  # fmt: skip
                wait_for(lambda: c.get("/health/ready").status_code == 200, 30)
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
                assert _log_has(log, "SIGHUP: reloaded")
                # a file that does not validate: logged by path, the configuration stays
                path.write_text("models: [{name: m, versions: [{name: v1, weight: -3}]}]")
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: _log_has(log, "models[0].versions[0].weight: must be ≥ 0"), 10)
                assert _version_of(c) == "v2"
                # a file that is not UTF-8: one line, no traceback
                path.write_bytes(b"models:\n  - name: \xff\n")
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: _log_has(log, "is not UTF-8 text"), 10)
                assert _version_of(c) == "v2"
                assert proc.poll() is None
        finally:
            proc.terminate()
            proc.communicate(timeout=20)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text
        lines = [line for line in text.splitlines() if "SIGHUP: keeping" in line]
        assert len(lines) == 2 and "byte 0xff at offset 18" in lines[1]


def test_rollout_admin_api_advances_and_rolls_back():
    a, b = FakeReplica("a"), FakeReplica("b")
    with ServerThread(a.app()) as sa, ServerThread(b.app()) as sb:
        doc = fleet({"v1": [sa.url], "v2": [sb.url]}, rollout={
            "baseline": "v1", "candidate": "v2", "min_samples_for_judgement": 1,
            "steps": [{"weight": 10, "min_requests": 0, "min_duration_s": 0},
                      {"weight": 50, "min_requests": 10**6, "min_duration_s": 0}],
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
            # split traffic until the step's window has a request of each version (the
            # runner advances on its own, every second, once it has)
            for i in range(500):
                if c.get("/admin/rollouts/m").json()["step_index"] == 1:
                    break
                c.post(
                    "/v1/completions", json={"model": "m", "prompt": f"{i}", "stream": i % 2 == 1}
                )
            wait_for(lambda: c.get("/admin/rollouts/m").json()["step_index"] == 1, 10)
            status = c.get("/admin/rollouts/m").json()
            assert status["candidate_weight"] == 50 and status["history"][0]["action"] == "advance"
            r = c.post("/admin/rollouts/m/rollback", json={"reason": "test"})
            assert r.status_code == 200
            final = r.json()
            assert final["status"] == "rolled_back" and final["history"][-1]["action"] == "rollback"
            assert c.get("/admin/replicas").json()["m"]["v2"]["weight"] == 0
            ab = c.get("/admin/ab/m").json()
            assert ab["baseline"] == "v1" and "v2" in ab["comparisons"]
