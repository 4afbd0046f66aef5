"""Issue 16, part 1, as real ``lmfleet serve`` processes started with
``--fault-injection``: a request that fails alone leaves the replica serving; a dead
engine fails ``/health/live`` and the process exits with status 1 after
``--exit-on-engine-dead-after``, so that a supervisor replaces it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

from lmfleet.engine.faults import fault_request_id
from tests.server.processes import ServeProcess, launch_serve, stop_all, wait_ready

pytestmark = pytest.mark.integration

GRACE_S = "3"
TINY_FLAGS = ("--device", "cpu", "--kv-cache-memory", "8Mi", "--max-model-len", "512")
EXIT_WAIT_S = 60  # a deadline for the exit, not a bound on how fast it comes


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, ServeProcess]]:
    """A simulated replica (engine thread) and a tiny-model one (engine process),
    started at once."""
    home = tmp_path_factory.mktemp("dead-exit")
    env = {**os.environ, "LMFLEET_HOME": str(home)}
    common = ("--fault-injection", "--exit-on-engine-dead-after", GRACE_S)
    started = {
        "sim": launch_serve("sim:llama-50m-cpu", home, "--sim-time-scale", "50", *common, env=env),
        "tiny-process": launch_serve(
            str(tiny_model_dir), home, *TINY_FLAGS, "--engine-process", *common, env=env
        ),
    }
    try:
        for s in started.values():
            wait_ready(s)
        yield started
    finally:
        stop_all(started.values())


def _complete(server: ServeProcess, request_id: str | None = None) -> httpx.Response:
    body: dict[str, object] = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}
    if request_id is not None:
        body["request_id"] = request_id
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)


def _assert_dies_and_exits(server: ServeProcess) -> None:
    r = _complete(server, fault_request_id("step", 2))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
    live = httpx.get(f"{server.url}/health/live", timeout=5)
    assert live.status_code == 503 and live.json()["status"] == "engine_dead"
    assert _complete(server).status_code == 503
    assert server.proc.wait(timeout=EXIT_WAIT_S) == 1, server.logs()
    assert "the engine died" in server.logs()


def test_sim_replica_fails_one_request_then_exits_when_its_engine_dies(servers):
    sim = servers["sim"]
    r = _complete(sim, fault_request_id("sample", 2))
    assert r.status_code == 500 and r.json()["error"]["code"] == "request_failed", r.text
    ok = _complete(sim)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    assert httpx.get(f"{sim.url}/health/live").status_code == 200
    deadline = time.monotonic() + 10
    while (state := sim.state())["kv_blocks_free"] != state["kv_blocks_total"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    assert not state["engine_dead"]
    _assert_dies_and_exits(sim)


def test_engine_process_replica_exits_when_its_core_dies(servers):
    _assert_dies_and_exits(servers["tiny-process"])


def test_help_names_the_flags():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--exit-on-engine-dead-after" in out and "--fault-injection" in out
