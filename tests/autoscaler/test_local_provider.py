"""The local provider with real ``lmfleet serve sim:PROFILE`` child processes.

The test profile reaches each child through ``LMFLEET_SIM_PROFILES`` (the spec's
env); ``--sim-time-scale`` makes loading, sleeping and waking take a fraction of a
second. Every wait polls with a deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from lmfleet.autoscaler.observation import ReplicaPhase
from lmfleet.autoscaler.providers import (
    LocalProvider,
    ReplicaActionFailed,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartFailed,
    ReplicaStatus,
    UnknownReplica,
)
from lmfleet.autoscaler.providers.local import _alive, kill_stale
from lmfleet.engine.sim.profile import PROFILES_ENV
from lmfleet.errors import ConfigError

MODEL = "sim:test-provider"
SCALE = 2.0
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
    "sleep_s": 0.4,
    "wake_s": 0.6,
}
DEADLINE_S = 90.0  # generous: the machine may be busy; only a hang reaches it


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "profiles.json").write_text(json.dumps({MODEL.removeprefix("sim:"): PROFILE}))
    return tmp_path


def _spec(home: Path, **kw) -> ReplicaSpec:
    env = {"LMFLEET_HOME": str(home), PROFILES_ENV: str(home / "profiles.json")}
    args = ("--sim-time-scale", str(SCALE), "--served-model-name", "tiny")
    args += ("--disable-uvicorn-access-log",)
    values: dict = {"model": MODEL, "version": "tiny/v1", "engine_args": args, "env": env}
    return ReplicaSpec(**(values | kw))


def _provider(home: Path, **kw) -> LocalProvider:
    return LocalProvider(home / "run", **kw)


def _run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 5 * DEADLINE_S))  # type: ignore[arg-type]


async def _until(predicate: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await _value(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def _value(value: bool | Awaitable[bool]) -> bool:
    return await value if inspect.isawaitable(value) else value


async def _state_of(provider: LocalProvider, replica_id: str) -> ReplicaHandle:
    return next(h for h in await provider.list() if h.id == replica_id)


def _gone(pids: list[int]) -> bool:
    return not any(_alive(p) for p in pids)


def _http() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=30)


def _completion(max_tokens: int, **kw) -> dict:
    return {
        "model": "tiny", "prompt": "ba be bi", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, **kw,
    }  # fmt: skip


async def _stream_events(http: httpx.AsyncClient, url: str, max_tokens: int):
    """Yield each SSE payload of a streamed completion (usage included)."""
    body = _completion(max_tokens, stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line.removeprefix("data: "))


# ---- no process ------------------------------------------------------------------------
def test_spec_is_validated():
    with pytest.raises(ConfigError, match="model must be a non-empty string"):
        ReplicaSpec(model="", version="v1")
    with pytest.raises(ConfigError, match="load_timeout_s must be a number > 0"):
        ReplicaSpec(model=MODEL, version="v1", load_timeout_s=0)
    spec = ReplicaSpec(model=MODEL, version="v1", engine_args=["--max-num-seqs", "8"])  # type: ignore[arg-type]
    assert spec.engine_args == ("--max-num-seqs", "8")


def test_status_maps_to_the_policy_phases():
    assert ReplicaStatus.STOPPED.phase is None
    for status in set(ReplicaStatus) - {ReplicaStatus.STOPPED}:
        assert status.phase is ReplicaPhase(status.value)


def test_provider_owned_flags_are_refused(home):
    async def main():
        async with _provider(home) as provider:
            for flag in ("--port", "--drain-timeout=5", "--admin-token"):
                with pytest.raises(ConfigError, match=f"must not set {flag.split('=')[0]}"):
                    await provider.start(_spec(home, engine_args=(flag, "1")))
            assert await provider.list() == []
            with pytest.raises(UnknownReplica, match="no replica 'nope'"):
                await provider.wake("nope")

    _run(main())


# ---- lmfleet serve --port 0 --port-file ------------------------------------------------
@pytest.mark.integration
def test_serve_port_zero_writes_port_file(home):
    port_file = home / "run" / "serve.port"
    port_file.parent.mkdir()
    log = home / "serve.log"
    env = {**os.environ, "LMFLEET_HOME": str(home), PROFILES_ENV: str(home / "profiles.json")}
    cmd = [
        sys.executable, "-m", "lmfleet.cli", "serve", MODEL, "--host", "127.0.0.1",
        "--port", "0", "--port-file", str(port_file), "--sim-time-scale", str(SCALE),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert 0 < port < 65536
        assert [p.name for p in port_file.parent.iterdir()] == ["serve.port"]  # no temp file
        with httpx.Client(trust_env=False, base_url=f"http://127.0.0.1:{port}") as http:
            while http.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        assert f"listening: host=127.0.0.1 port={port} pid={proc.pid}" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_serve_exit_with_parent_refuses_when_the_parent_is_gone(home):
    not_my_parent = os.getpid() + 1_000_000  # no such process is this child's parent
    result = subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", "serve", MODEL, "--port", "0",
         "--exit-with-parent", str(not_my_parent)],
        capture_output=True, text=True, timeout=DEADLINE_S, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"the parent process {not_my_parent} is gone" in result.stderr


# ---- the provider with real children --------------------------------------------------
@pytest.mark.integration
def test_two_replicas_ready_on_distinct_ports_then_close_leaves_none(home):
    changes: list[tuple[str, str]] = []

    async def main() -> list[int]:
        provider = _provider(home, on_change=lambda h: changes.append((h.id, h.state.value)))
        async with provider:
            started = [await provider.start(_spec(home)) for _ in range(2)]
            assert [h.state for h in started] == [ReplicaStatus.STARTING] * 2
            ready = [await provider.wait_ready(h.id) for h in started]
            assert all(h.state is ReplicaStatus.READY for h in ready)
            assert all(h.ready_at is not None and h.time_to_ready_s > 0 for h in ready)
            ports = {httpx.URL(h.url).port for h in ready}
            assert len(ports) == 2
            async with _http() as http:
                for h in ready:
                    r = await http.post(f"{h.url}/v1/completions", json=_completion(5))
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
                    state = (await http.get(f"{h.url}/state")).json()
                    assert (state["state"], state["model"]) == ("ready", "tiny")
            listed = await provider.list()
            assert [h.id for h in listed] == [h.id for h in started]
            assert all(h.log_path.exists() and h.pid for h in listed)
            run = provider.run_dir
            assert sorted(p.name for p in run.glob("*.pid")) == sorted(
                f"{h.id}.pid" for h in started
            )
            pids = [h.pid for h in listed]
        assert _gone(pids)  # close waited for every child to exit
        assert not list(run.glob("*.pid")) and not list(run.glob("*.port"))
        return [h.id for h in started]

    ids = asyncio.run(main())
    for replica_id in ids:
        states = [s for i, s in changes if i == replica_id]
        assert states == ["starting", "ready", "draining", "stopped"]


@pytest.mark.integration
def test_drain_lets_a_long_stream_finish_then_the_process_exits_zero(home):
    max_tokens = 200

    async def main():
        async with _provider(home) as provider, _http() as http:
            h = await provider.start(_spec(home, drain_timeout_s=60))
            h = await provider.wait_ready(h.id)
            async with contextlib.aclosing(_stream_events(http, h.url, max_tokens)) as events:
                finish, usage = None, None
                await anext(events)  # the first token is out: drain now, mid-stream
                drain = asyncio.create_task(provider.drain(h.id))

                async def draining() -> bool:
                    return (await _state_of(provider, h.id)).state is ReplicaStatus.DRAINING

                await _until(draining, "the provider reports the replica draining")
                state = (await http.get(f"{h.url}/state")).json()
                assert (state["state"], state["in_flight_requests"]) == ("draining", 1)
                assert (await http.get(f"{h.url}/health/ready")).status_code == 503
                async for event in events:
                    for choice in event["choices"]:
                        finish = choice["finish_reason"] or finish
                    usage = event.get("usage") or usage
            assert (finish, usage["completion_tokens"]) == ("length", max_tokens)
            final = await drain
            assert (final.state, final.exit_code) == (ReplicaStatus.STOPPED, 0)
            assert await provider.list() == []  # a stopped replica is forgotten
            assert "drained: every request finished" in final.log_path.read_text()

    _run(main())


@pytest.mark.integration
def test_sleep_and_wake_follow_the_server_state(home):
    changes: list[str] = []

    async def main():
        provider = _provider(home, on_change=lambda h: changes.append(h.state.value))
        async with provider, _http() as http:
            h = await provider.wait_ready((await provider.start(_spec(home))).id)

            async def server_state() -> str:
                return (await http.get(f"{h.url}/state")).json()["state"]

            # a replica with a request in flight refuses to sleep, and stays READY
            async with contextlib.aclosing(_stream_events(http, h.url, 100)) as events:
                await anext(events)
                with pytest.raises(ReplicaActionFailed, match="requests in flight"):
                    await provider.sleep(h.id)
                assert (await _state_of(provider, h.id)).state is ReplicaStatus.READY
                async for _ in events:
                    pass

            slept = await provider.sleep(h.id)
            assert slept.state is ReplicaStatus.ASLEEP and await server_state() == "asleep"
            assert (await http.get(f"{h.url}/health/ready")).status_code == 503
            assert (await provider.sleep(h.id)).state is ReplicaStatus.ASLEEP  # already
            woke = await provider.wake(h.id)
            assert woke.state is ReplicaStatus.READY and await server_state() == "ready"
            assert woke.wake_s is not None and woke.wake_s > 0
            r = await http.post(f"{h.url}/v1/completions", json=_completion(3))
            assert r.json()["usage"]["completion_tokens"] == 3
            assert (await provider.wake(h.id)).state is ReplicaStatus.READY  # already awake

    _run(main())
    assert changes[:7] == ["starting", "ready", "asleep", "ready", "asleep", "waking", "ready"]


@pytest.mark.integration
def test_a_killed_or_hung_child_is_reported_dead(home):
    async def main():
        provider = _provider(home, poll_interval_s=0.2, live_timeout_s=0.5, live_failures=2)
        async with provider:
            killed, hung = [await provider.start(_spec(home)) for _ in range(2)]
            for h in (killed, hung):
                await provider.wait_ready(h.id)
            os.kill(killed.pid, signal.SIGKILL)
            os.kill(hung.pid, signal.SIGSTOP)  # alive, but answers nothing

            async def both_dead() -> bool:
                return all(h.state is ReplicaStatus.DEAD for h in await provider.list())

            await _until(both_dead, "both replicas are reported dead")
            k, s = await _state_of(provider, killed.id), await _state_of(provider, hung.id)
            assert (
                k.exit_code == -signal.SIGKILL and "exited unasked with signal SIGKILL" in k.detail
            )
            assert "liveness failed 2 times in a row" in s.detail
            await _until(lambda: _gone([hung.pid]), "the hung replica is killed")
            with pytest.raises(ReplicaStartFailed, match=f"replica {killed.id} is dead"):
                await provider.wait_ready(killed.id)
            # DEAD ones stay listed until stopped, which forgets them
            assert (await provider.stop(killed.id)).state is ReplicaStatus.DEAD
            assert (await provider.stop(hung.id)).state is ReplicaStatus.DEAD
            assert await provider.list() == []
            assert not list(provider.run_dir.glob("*.pid"))

    _run(main())


@pytest.mark.integration
def test_a_replica_not_ready_within_its_load_budget_is_killed(home):
    async def main():
        async with _provider(home) as provider:
            h = await provider.start(_spec(home, load_timeout_s=0.5))
            with pytest.raises(ReplicaStartFailed, match=r"load budget of 0\.5 s"):
                await provider.wait_ready(h.id)
            await _until(lambda: _gone([h.pid]), "the replica is killed")
            assert (await _state_of(provider, h.id)).state is ReplicaStatus.DEAD

    _run(main())


# ---- no orphans -------------------------------------------------------------------------
_PARENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from lmfleet.autoscaler.providers import LocalProvider, ReplicaSpec

    async def main():
        spec = ReplicaSpec(**json.loads(sys.argv[2]))
        async with LocalProvider(sys.argv[1]) as provider:
            handles = [await provider.start(spec) for _ in range(2)]
            for h in handles:
                await provider.wait_ready(h.id)
            print(json.dumps([h.pid for h in handles]), flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.integration
def test_children_exit_when_the_parent_is_sigkilled(home):
    spec = _spec(home)
    fields = {
        "model": spec.model, "version": spec.version,
        "engine_args": list(spec.engine_args), "env": dict(spec.env),
    }  # fmt: skip
    run = home / "run"
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(run), json.dumps(fields)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        ready, _, _ = select.select([parent.stdout], [], [], DEADLINE_S)
        assert ready and parent.poll() is None, "the parent script did not report its children"
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 2 and not _gone(pids)
        parent.kill()
        parent.wait()
        while not _gone(pids):  # PR_SET_PDEATHSIG: each child got SIGTERM and drained
            assert time.monotonic() < deadline, f"children {pids} outlived their parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
    # a new provider on the run dir finds their pid files and nothing left to kill
    assert len(list(run.glob("*.pid"))) == 2
    assert asyncio.run(kill_stale(run)) == []
    assert not list(run.glob("*.pid"))


@pytest.mark.integration
def test_a_restart_kills_stale_replicas_of_its_run_dir_only(home):
    run = home / "run"
    run.mkdir()
    env = {**os.environ, "LMFLEET_HOME": str(home), PROFILES_ENV: str(home / "profiles.json")}
    stale = subprocess.Popen(
        [sys.executable, "-m", "lmfleet.cli", "serve", MODEL, "--host", "127.0.0.1",
         "--port", "0", "--port-file", str(run / "old-1.port")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (run / "old-1.pid").write_text(f"{stale.pid}\n")
        (run / "other.pid").write_text(f"{bystander.pid}\n")  # a reused pid, say
        (run / "junk.pid").write_text("not a pid\n")
        killed = asyncio.run(kill_stale(run))
        assert killed == [stale.pid]
        assert stale.wait(timeout=DEADLINE_S) == -signal.SIGKILL
        assert bystander.poll() is None
        assert not list(run.glob("*.pid"))
    finally:
        for proc in (stale, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
