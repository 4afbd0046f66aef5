"""``bench serve`` end to end: against a simulated engine whose step time is known,
and against the fake server for sessions, rates, concurrency caps and errors."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import pytest

from lmfleet.bench.client import Target
from lmfleet.bench.metrics import BenchSummary, summarize
from lmfleet.bench.monitor import MonitorSettings
from lmfleet.bench.runner import ServeRun, ServeSettings, run_serve
from lmfleet.bench.workloads import WordRenderer, WorkloadSpec, random_workload
from tests.bench.conftest import DECODE_SEQ_S, FIXED_S, PREFILL_TOKEN_S
from tests.bench.servers import FakeOpenAI, ServerThread, engine_app

WORDS = WordRenderer([f"w{i}" for i in range(40_000)])


def bench(
    url: str, spec: WorkloadSpec, renderer: WordRenderer = WORDS, **settings: object
) -> tuple[ServeRun, BenchSummary]:
    target = settings.pop("target", None) or Target(url, "")
    run = asyncio.run(
        run_serve(ServeSettings(target=target, **settings), random_workload(spec), renderer)
    )  # type: ignore[arg-type]
    return run, summarize(
        run.records,
        run.duration_s,
        requested_rate=float(settings.get("request_rate", float("inf"))),
    )  # type: ignore[arg-type]


def step(prefill_tokens: int, decode_seqs: int) -> float:
    return FIXED_S + PREFILL_TOKEN_S * prefill_tokens + DECODE_SEQ_S * decode_seqs


@pytest.mark.slow
def test_ttft_and_tpot_follow_the_sim_profile(sim_profile: str) -> None:
    """One request at a time: TTFT is one prefill step, TPOT one decode step of a
    batch of one; four at a time: TPOT is a decode step of a batch of four."""
    spec = WorkloadSpec(num_prompts=4, input_len=50, output_len=16)
    # other prompts for the second run: the same ones would hit the prefix cache
    # and prefill in less than the profile's time
    spec4 = dataclasses.replace(spec, seed=1)
    with ServerThread(engine_app(sim_profile), lifespan="on") as server:
        renderer = WordRenderer.sim()
        _, one = bench(server.url, spec, renderer, max_concurrency=1)
        run4, four = bench(server.url, spec4, renderer, max_concurrency=4)
    assert one.completed == four.completed == 4 and one.total_output_tokens == 64
    assert one.total_input_tokens == 200  # one word, one token
    # the HTTP hop and the engine's own bookkeeping add a few milliseconds
    assert step(50, 0) <= one.ttft.median <= step(50, 0) + 0.03
    assert one.tpot.median == pytest.approx(step(0, 1), rel=0.15)
    assert one.itl.median == pytest.approx(step(0, 1), rel=0.15)
    assert four.max_concurrency == 4
    assert four.tpot.median == pytest.approx(step(0, 4), rel=0.15)
    # four prompts prefilled in one step (all wait step(200)), or in two when one
    # arrives a moment late (it waits step(50), the other three step(50) + step(150))
    ttfts = sorted(r.ttft for r in run4.records if r.ttft is not None)
    assert len(ttfts) == 4 and ttfts[0] >= step(50, 0)
    assert step(200, 0) - 0.02 <= four.ttft.median <= step(50, 0) + step(150, 0) + 0.03
    assert run4.model == sim_profile  # resolved from /v1/models


def test_sessions_send_the_history(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.ttft_s, fake.gap_s = 0.005, 0.001
    spec = WorkloadSpec(num_prompts=6, input_len=3, output_len=2, num_turns=3, prefix_len=2)
    run, s = bench(fake_server.url, spec)
    assert s.completed == 6
    by_session: dict[str, list[str]] = {}
    for body in fake.bodies:
        by_session.setdefault(body["prompt"].split()[2], []).append(body["prompt"])
    assert len(by_session) == 2
    for prompts in by_session.values():
        t0, t1, t2 = prompts
        # each turn: the previous prompt, the answer it got (w0 w1), a new message
        assert t1.startswith(t0 + " w0 w1 ") and len(t1.split()) == len(t0.split()) + 2 + 3
        assert t2.startswith(t1 + " w0 w1 ")
    assert len({p.split()[0] for p in fake.prompts}) == 1  # the shared prefix
    turn2 = [r for r in run.records if r.turn == 2]
    assert {r.input_len for r in turn2} == {2 + 3 * 3 + 2 * 2}


def test_chat_sessions(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.ttft_s = fake.gap_s = 0.001
    spec = WorkloadSpec(num_prompts=4, input_len=3, output_len=2, num_turns=2, prefix_len=1)
    _, s = bench(fake_server.url, spec, target=Target(fake_server.url, "ok", chat=True))
    assert s.completed == 4
    last = fake.bodies[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[2]["content"] == " w0 w1"


def test_rate_concurrency_cap_and_monitor(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.ttft_s, fake.gap_s = 0.01, 0.005
    spec = WorkloadSpec(num_prompts=60, input_len=4, output_len=5)
    run, s = bench(
        fake_server.url, spec, request_rate=100.0, monitor=MonitorSettings(fake_server.url)
    )
    assert s.completed == 60 and s.failed == 0
    assert s.achieved_rate_ratio == pytest.approx(1.0, abs=0.1)
    assert s.send_lag.median < 0.02
    assert run.samples and run.samples[0].replicas == 3.0
    assert run.client_cpu_s > 0 and run.client_cpu_fraction < 2.5
    fake.max_running = 0
    run, s = bench(fake_server.url, spec, max_concurrency=3)
    assert fake.max_running <= 3 and s.max_concurrency <= 3 and s.completed == 60
    assert run.samples == []  # no monitor asked for


def test_failures_are_counted_by_type(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    spec = WorkloadSpec(num_prompts=5, input_len=2, output_len=3)
    _, s = bench(fake_server.url, spec, target=Target(fake_server.url, "status-503"))
    assert (s.completed, s.failed, s.errors) == (0, 5, {"http_503": 5})
    assert s.request_throughput == 0


@pytest.mark.integration
@pytest.mark.slow
def test_against_the_real_replica_server(sim_profile: str) -> None:
    """lmfleet's own server (in this process): the bench's numbers follow the profile
    there too; TTFT gets a looser bound (the server's admission and bookkeeping)."""
    from lmfleet.server.app import build_app
    from lmfleet.server.settings import ServerSettings

    app = build_app(
        ServerSettings(model=sim_profile, warmup=False, progress=False, access_log=False)
    )
    spec = WorkloadSpec(num_prompts=4, input_len=50, output_len=16)
    with ServerThread(app, lifespan="on") as server:
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "replica never became ready"
            time.sleep(0.02)
        run, s = bench(
            server.url,
            spec,
            WordRenderer.sim(),
            max_concurrency=1,
            monitor=MonitorSettings(server.url, interval_s=0.1),
        )
    assert s.completed == 4 and s.total_output_tokens == 64 and s.total_input_tokens == 200
    assert step(50, 0) <= s.ttft.median <= step(50, 0) + 0.1
    assert s.tpot.median == pytest.approx(step(0, 1), rel=0.15)
    assert run.samples and {x.running for x in run.samples} <= {0.0, 1.0}
