"""``lmfleet serve sim:PROFILE`` as a real process: the simulated accelerator behind
the whole server, driven over HTTP by the official ``openai`` client.

The test profile reaches the server process through ``LMFLEET_SIM_PROFILES``; its
times are halved by ``--sim-time-scale 2``, so the expected durations below are the
profile's divided by ``SCALE``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmfleet.engine.sim.profile import PROFILES_ENV, get_profile
from lmfleet.errors import ConfigError
from lmfleet.server.settings import ServerSettings
from tests.server.processes import ServeProcess, launch_serve, stop_all, wait_ready

MODEL = "sim:test-serve"
SCALE = 2.0
BLOCK_SIZE = 16
PROFILE = {
    "base": "llama-8b-h100",
    "fixed_s": 0.02,  # 10 ms steps at SCALE 2: a 200-token stream takes ~2 s
    "prefill_token_s": 2e-5,
    "decode_seq_s": 1e-4,
    "kv_token_s": 0.0,
    "kv_capacity_tokens": 1 << 16,
    "max_model_len": 4096,
    "vocab_size": 2000,
    "load_s": 0.8,
    "sleep_s": 0.6,
    "wake_s": 1.0,
}


SimServer = ServeProcess


def _launch(home: Path, *flags: str) -> SimServer:
    env = {**os.environ, "LMFLEET_HOME": str(home), PROFILES_ENV: str(home / "profiles.json")}
    return launch_serve(
        MODEL,
        home,
        "--sim-time-scale",
        str(SCALE),
        "--block-size",
        str(BLOCK_SIZE),
        *flags,
        env=env,
    )


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory) -> Iterator[dict[str, SimServer]]:
    home = tmp_path_factory.mktemp("sim-serve")
    (home / "profiles.json").write_text(json.dumps({MODEL.removeprefix("sim:"): PROFILE}))
    servers = {"main": _launch(home), "drain": _launch(home, "--drain-timeout", "60")}
    try:
        for s in servers.values():
            wait_ready(s)
        yield servers
    finally:
        stop_all(servers.values())


@pytest.fixture
def server(sim_fleet) -> SimServer:
    return sim_fleet["main"]


def _request(max_tokens: int = 24) -> dict:
    return {
        "model": MODEL,
        "prompt": "ba be bi bo",
        "max_tokens": max_tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }


# ---- settings and the profile file (no process) ----------------------------------------
def test_sim_time_scale_only_for_sim_models():
    st = ServerSettings(model=MODEL, sim_time_scale=4.0, device="cuda")
    assert st.engine_config().model.sim_time_scale == 4.0
    assert st.resolved_device == "cpu"  # nothing of the simulator runs on a device
    assert ServerSettings(model=MODEL).engine_config().model.sim_time_scale == 1.0
    with pytest.raises(ConfigError, match="sim_time_scale: only applies to simulated"):
        ServerSettings(model="/models/llama", sim_time_scale=2.0)


def test_profiles_file(tmp_path, monkeypatch):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"mine": PROFILE, "broken": {"base": "nope"}}))
    monkeypatch.setenv(PROFILES_ENV, str(path))
    with pytest.raises(ConfigError, match="unknown base profile 'nope'"):
        get_profile("mine")
    path.write_text(json.dumps({"mine": PROFILE}))
    mine = get_profile("mine")
    assert (mine.name, mine.load_s, mine.vocab_size) == ("mine", 0.8, 2000)
    assert mine.weight_bytes == get_profile("llama-8b-h100").weight_bytes  # from the base
    with pytest.raises(ConfigError, match=r"known: .*mine"):
        get_profile("other")


# ---- the server process ---------------------------------------------------------------
async def _poll_state(http: httpx.AsyncClient, done, timeout: float = 30.0) -> dict:
    """``/state`` once ``done(state)`` holds; fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(state := (await http.get("/state")).json()):
        assert loop.time() < deadline, f"condition not met: {state}"
        await asyncio.sleep(0.02)
    return state


@pytest.mark.integration
def test_same_request_same_tokens(server):
    with server.client() as client:
        models = client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        a = client.completions.create(**_request(), logprobs=1)
        b = client.completions.create(**_request(), logprobs=1)
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
        assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
        assert a.usage.completion_tokens == 24 and a.model == MODEL
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "ba be"}],
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        words = "".join(c.choices[0].delta.content or "" for c in chat if c.choices).split()
        assert len(words) == 8  # one vocabulary word per simulated token


@pytest.mark.integration
def test_state_and_metrics_show_profile(server):
    expected_load = PROFILE["load_s"] / SCALE
    state = server.state()
    assert state["model"] == MODEL and state["state"] == "ready"
    # the simulated load waits at least its profile time (no upper bound: load slows it)
    assert state["load_seconds"] >= expected_load * 0.999
    assert state["max_model_len"] == PROFILE["max_model_len"]
    blocks = PROFILE["kv_capacity_tokens"] // BLOCK_SIZE
    assert state["kv_blocks_total"] == blocks
    assert server.metric("lmfleet_model_load_seconds") == pytest.approx(state["load_seconds"])
    assert server.metric("lmfleet_model_load_bytes") == get_profile("llama-8b-h100").weight_bytes
    assert server.metric("lmfleet_kv_blocks_total") == blocks


@pytest.mark.integration
def test_sleep_and_wake_take_profile_times(server):
    headers = {"Authorization": "Bearer none"}
    t0 = time.perf_counter()
    slept = httpx.post(f"{server.url}/admin/sleep", headers=headers, timeout=30)
    sleep_wall = time.perf_counter() - t0
    assert slept.status_code == 200 and slept.json()["state"] == "asleep"
    with server.client() as client, pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**_request(2))
    assert err.value.status_code == 503
    t0 = time.perf_counter()
    woke = httpx.post(f"{server.url}/admin/wake", headers=headers, timeout=30)
    wake_wall = time.perf_counter() - t0
    assert woke.status_code == 200 and woke.json()["state"] == "ready"

    sleep_s, wake_s = PROFILE["sleep_s"] / SCALE, PROFILE["wake_s"] / SCALE
    reported_sleep, reported_wake = slept.json()["sleep_seconds"], woke.json()["wake_seconds"]
    # lower bounds only, each physically guaranteed: the simulator waits at least its
    # profile time, and the server's measure lies inside the client's round trip
    assert sleep_wall >= reported_sleep >= sleep_s * 0.999
    assert wake_wall >= reported_wake >= wake_s * 0.999
    state = server.state()
    assert (state["last_sleep_seconds"], state["last_wake_seconds"]) == (
        reported_sleep,
        reported_wake,
    )
    assert server.metric("lmfleet_sleep_seconds") == pytest.approx(reported_sleep)
    assert server.metric("lmfleet_wake_seconds") == pytest.approx(reported_wake)
    with server.client() as client:  # serves again after waking
        assert client.completions.create(**_request(2)).usage.completion_tokens == 2


@pytest.mark.integration
def test_sigterm_drains_streams_mid_way(sim_fleet):
    server = sim_fleet["drain"]
    num_streams, max_tokens = 4, 200

    async def run() -> list[tuple[int, str | None]]:
        started = asyncio.Event()
        first_tokens = 0

        async def one(client: openai.AsyncOpenAI) -> tuple[int, str | None]:
            nonlocal first_tokens
            stream = await client.completions.create(
                **_request(max_tokens), stream=True, stream_options={"include_usage": True}
            )
            chunks, tokens, finish = 0, 0, None
            async for chunk in stream:
                chunks += 1
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if chunks == 1:
                    first_tokens += 1
                    if first_tokens == num_streams:
                        started.set()
            return tokens, finish

        async with server.aclient() as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(num_streams)]
            await asyncio.wait_for(started.wait(), 30)
            server.proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=server.url) as http:
                await _poll_state(http, lambda st: st["state"] == "draining")
            with pytest.raises(openai.APIStatusError) as err:
                await client.completions.create(**_request(2))
            assert err.value.status_code == 503
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert results == [(max_tokens, "length")] * num_streams
    assert server.proc.wait(timeout=60) == 0
    logs = server.logs()
    # the count the server took when the drain began: every stream was mid-way
    assert f"draining: {num_streams} requests in flight" in logs, logs
    assert "drained: every request finished" in logs
