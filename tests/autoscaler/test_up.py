"""``lmfleet up`` end to end: a real process running the gateway, the control loop
and real ``lmfleet serve sim:...`` replicas (the fast profile of
``fleet_process``), driven over HTTP as an operator would. Every wait polls with a
deadline; no test asserts how long anything took."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.autoscaler.fleet_process import FleetProcess, alive, fleet_file, stream_text

pytestmark = pytest.mark.slow


def _pids(fleet: FleetProcess) -> list[int]:
    return [r["pid"] for r in fleet.replicas() if r["pid"]]


def _started(fleet: FleetProcess) -> int:
    return sum(d["start"] for d in fleet.decisions())


def test_burst_scales_up_then_down_without_cutting_a_stream(tmp_path: Path) -> None:
    """8 long streams against one replica (target 2 per replica): a scale-up to
    3 (max) within a decision or two, the new replicas take traffic once READY; then
    the load falls to one stream and the fleet goes back to 1, draining victims that
    still serve streams: every stream's text equals an undisturbed run's. Round robin
    puts the two lone streams on two replicas (least-outstanding may stack them on one
    while the others' polled counts are stale), so one of them must be drained."""
    with FleetProcess(tmp_path, fleet_file(tmp_path, balancing="round_robin")) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 1, "the first replica")
        prompts = [f"request {i} of the burst" for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream_text, fleet.url, p, 600) for p in prompts]
            fleet.wait_for(lambda: any(d["desired"] >= 3 for d in fleet.decisions()),
                           "a scale-up decision")  # fmt: skip
            fleet.wait_for(lambda: len(fleet.routable()) == 3, "three routable replicas")
            burst = [f.result() for f in futures]
        # a lone long stream: the others have gone, so the fleet scales down while
        # it runs; the victims drain (no cut stream), down to min 1
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            lone = [pool.submit(stream_text, fleet.url, f"lone {i}", 2500) for i in range(2)]
            fleet.wait_for(lambda: len(fleet.replicas()) == 1, "the scale-down to 1", 180)
            lone_results = [f.result() for f in lone]
        downs = [d for d in fleet.decisions() if d["drain"]]
        assert downs and all(len(d["drain"]) == 1 for d in downs)  # one step at a time
        # a victim was drained while it still served a stream (which finished)
        drained = re.findall(r"draining \S+ with (\d+) request", fleet.output(limit=None))
        assert len(drained) == 2 and max(map(int, drained)) >= 1
        # nothing was started beyond max
        assert _started(fleet) == 3
        # the same requests undisturbed (from one replica, which scales up again)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            again = [pool.submit(stream_text, fleet.url, p, 600) for p in prompts]
            lone_again = [pool.submit(stream_text, fleet.url, f"lone {i}", 2500) for i in range(2)]
            assert [f.result() for f in again] == burst
            assert [f.result() for f in lone_again] == lone_results
        assert all(finish == "length" for _, finish in burst + lone_results)
        assert "died" not in fleet.output(limit=None)


def test_sigterm_drains_streams_and_leaves_no_child(tmp_path: Path) -> None:
    with FleetProcess(tmp_path, fleet_file(tmp_path, replicas={"min": 2})) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 2, "two routable replicas")
        pids = _pids(fleet)
        reference = stream_text(fleet.url, "drained on the way out", 400)
        # lmfleet status shows the same fleet (plain lines: stdout is not a terminal)
        status = subprocess.run(
            [sys.executable, "-m", "lmfleet.cli", "status", fleet.url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        line = status.stdout.splitlines()[0]
        assert line.startswith("chat/v1: replicas 2 ready (2..3 desired 2); queue 0, in flight 0")
        assert "start 2" in status.stdout  # the first decision
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream_text, fleet.url, "drained on the way out", 400)
            fleet.wait_for(lambda: sum(r["inflight"] for r in fleet.replicas()) == 1,
                           "the stream in flight")  # fmt: skip
            assert fleet.terminate() == 0
            assert future.result() == reference
        assert not [p for p in pids if alive(p)]
        assert "fleet stopped" in fleet.output()


def test_second_sigint_stops_at_once_and_leaves_no_child(tmp_path: Path) -> None:
    with FleetProcess(tmp_path, fleet_file(tmp_path)) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 1, "the first replica")
        pids = _pids(fleet)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream_text, fleet.url, "cut short", 100_000 // 20)
            fleet.wait_for(lambda: sum(r["inflight"] for r in fleet.replicas()) == 1,
                           "the stream in flight")  # fmt: skip
            fleet.proc.send_signal(signal.SIGINT)
            fleet.wait_for(lambda: "draining the fleet" in fleet.output(), "the drain")
            fleet.proc.send_signal(signal.SIGINT)
            assert fleet.proc.wait(60) == 130
            with pytest.raises((httpx.HTTPError, AssertionError)):
                future.result()
        fleet.wait_for(lambda: not [p for p in pids if alive(p)], "the replicas gone", 30)


def test_sigkill_of_lmfleet_up_takes_the_replicas_along(tmp_path: Path) -> None:
    with FleetProcess(tmp_path, fleet_file(tmp_path, replicas={"min": 2})) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 2, "two routable replicas")
        pids = _pids(fleet)
        fleet.proc.send_signal(signal.SIGKILL)
        fleet.proc.wait(30)
        fleet.wait_for(lambda: not [p for p in pids if alive(p)], "the replicas gone", 60)


def test_scale_from_zero_the_first_request_waits_and_succeeds(tmp_path: Path) -> None:
    fleet_path = fleet_file(tmp_path, replicas={"min": 0})
    with FleetProcess(tmp_path, fleet_path) as fleet:
        fleet.wait_for(lambda: fleet.autoscaler()["ticks"] >= 2, "two decisions")
        assert fleet.replicas() == []
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
        answer = client.completions.create(model="chat", prompt="wake up", max_tokens=8,
                                           temperature=0)  # fmt: skip
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None and answer.usage.completion_tokens == 8
        decisions = fleet.decisions()
        assert decisions[0]["desired"] == 0 and decisions[0]["start"] == 0
        first = next(d for d in decisions if d["start"])
        assert (first["desired"], first["start"]) == (1, 1)
        assert first["inputs"]["queue_depth"] >= 1  # the waiting request asked for it
        # idle again: back to zero after the idle timeout
        fleet.wait_for(lambda: fleet.replicas() == [], "the scale to zero", 60)
        assert any(d["desired"] == 0 for d in fleet.decisions()[1:])


def test_standby_is_woken_before_any_cold_start(tmp_path: Path) -> None:
    """min 1, standby 1, max 2: the pool fills (a second replica started, then put
    to sleep); a burst wakes it, which takes the profile's wake time rather than a
    cold start, and no replica is started for the burst itself."""
    fleet_path = fleet_file(tmp_path, replicas={"min": 1, "max": 2, "standby": 1},
                            profile={"load_s": 2.0})  # fmt: skip
    with FleetProcess(tmp_path, fleet_path) as fleet:
        fleet.wait_for(
            lambda: sorted(r["phase"] for r in fleet.replicas()) == ["asleep", "ready"],
            "one ready replica and one asleep",
        )
        started_before = _started(fleet)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream_text, fleet.url, f"burst {i}", 400) for i in range(6)]
            fleet.wait_for(lambda: any(d["wake"] for d in fleet.decisions()), "a wake")
            fleet.wait_for(lambda: len(fleet.routable()) == 2, "the woken replica routable")
            for f in futures:
                assert f.result()[1] == "length"
        snap = fleet.autoscaler()["versions"]["chat/v1"]
        assert snap["wake_s"] is not None and snap["time_to_ready_s"] is not None
        # the profile's ratio: a 2 s load against a 0.1 s wake (with process start
        # on top of the load); measured by the provider, not by this test
        assert snap["wake_s"] < snap["time_to_ready_s"] / 5
        woke = next(d for d in fleet.decisions() if d["wake"])
        assert woke["start"] == 0 or "standby" in woke["reason"]
        assert _started(fleet) == started_before + woke["start"]


def test_a_killed_replica_is_replaced_and_its_stream_resumed(tmp_path: Path) -> None:
    with FleetProcess(tmp_path, fleet_file(tmp_path, replicas={"min": 2})) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 2, "two routable replicas")
        reference = stream_text(fleet.url, "survive a crash", 800)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream_text, fleet.url, "survive a crash", 800)
            busy = fleet.wait_for(
                lambda: [r for r in fleet.replicas() if r["running"] or r["inflight"]],
                "the stream on a replica",
            )
            os.kill(busy[0]["pid"], signal.SIGKILL)
            assert future.result() == reference
        victim = busy[0]["id"]
        fleet.wait_for(
            lambda: (
                len(fleet.routable()) == 2 and victim not in {r["id"] for r in fleet.replicas()}
            ),
            "a replacement",
        )
        assert "died" in fleet.output()


def test_a_slow_load_causes_no_cascade_of_starts(tmp_path: Path) -> None:
    """A 6 s cold start while the load stays: one scale-up, then nothing more is
    started while those replicas load (they are capacity to come). Scale-ahead is
    off: with it, a decision that sees the six arrivals at once may size for twice
    the load and reach max in one step (CI saw 5 starts), which says nothing of a
    cascade."""
    fleet_path = fleet_file(tmp_path, replicas={"min": 1, "max": 6},
                            autoscaling={"scale_ahead": False},
                            profile={"load_s": 6.0})  # fmt: skip
    with FleetProcess(tmp_path, fleet_path) as fleet:
        fleet.wait_for(lambda: len(fleet.routable()) == 1, "the first replica")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream_text, fleet.url, f"slow {i}", 1200) for i in range(6)]
            fleet.wait_for(lambda: any(d["start"] for d in fleet.decisions()[1:]), "a scale-up")
            fleet.wait_for(lambda: len(fleet.routable()) >= 2, "a new replica routable")
            for f in futures:
                assert f.result()[1] == "length"
            ups = [d for d in fleet.decisions()[1:] if d["start"]]
        # 6 streams at 2 per replica: at most 3 replicas, all started by one decision
        # (it may have seen fewer than six arrivals: then the starting replica holds
        # the rest, as capacity to come, and still nothing more is started)
        assert len(ups) == 1 and 1 <= ups[0]["start"] <= 2


def test_the_built_in_fleet_answers_its_first_question(tmp_path: Path) -> None:
    """The README's first command: the built-in fleet on real SmolLM2 replicas."""
    with FleetProcess(tmp_path, None) as fleet:
        fleet.wait_for(lambda: "asked" in fleet.output(), "the first answer", 300)
        assert "'The capital of France is Paris.'" in fleet.output()
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="none", max_retries=0)
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=16, temperature=0,
        )  # fmt: skip
        assert chat.choices[0].message.content
        assert fleet.terminate(120) == 0
