"""Lifecycle, admission, drain, sleep/wake, auth and metrics, in-process."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmfleet.server.replica import Replica

from .conftest import chat_body, serving, settings_for, wait_for

CHAT = "/v1/chat/completions"


def run(coro):
    return asyncio.run(coro)


def long_chat(max_tokens: int = 200, **extra) -> dict:
    return chat_body(max_tokens=max_tokens, ignore_eos=True, temperature=0, **extra)


def assert_error(response, status, code, *, retry_after: bool = False):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code, err
    if retry_after:
        assert response.headers["retry-after"] == "1"
    return err


class GatedReplica(Replica):
    """Loading waits for ``gate``, so the STARTING state can be observed."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.gate = asyncio.Event()

    async def load(self) -> None:
        await self.gate.wait()
        await super().load()


def test_health_while_starting_then_ready(tiny_model_dir):
    async def main():
        replica = GatedReplica(settings_for(tiny_model_dir))
        async with serving(tiny_model_dir, replica=replica, wait_ready=False) as (client, rep):
            assert (await client.get("/health/live")).status_code == 200
            for path in ("/health/ready", "/health"):
                r = await client.get(path)
                assert r.status_code == 503 and r.json()["state"] == "starting"
            state = (await client.get("/state")).json()
            assert state["state"] == "starting" and state["load_seconds"] is None
            assert_error(
                await client.post(CHAT, json=chat_body()), 503, "loading", retry_after=True
            )
            assert_error(await client.post("/tokenize", json={"prompt": "x"}), 503, "loading")
            metrics = (await client.get("/metrics")).text
            assert (
                'lmfleet_replica_state{model="tiny",state="starting",version="v1"} 1.0' in metrics
            )
            replica.gate.set()
            await wait_for(lambda: rep.ready, timeout=30)
            for path in ("/health/live", "/health/ready", "/health"):
                assert (await client.get(path)).status_code == 200
            state = (await client.get("/state")).json()
            assert state["state"] == "ready" and state["model"] == "tiny"
            assert state["version"] == "v1" and state["max_model_len"] == 512
            assert state["load_seconds"] > 0 and state["load_bytes"] > 1_000_000
            assert state["load_bytes_per_second"] > 0 and state["startup_seconds"] > 0
            metrics = (await client.get("/metrics")).text
            assert "lmfleet_model_load_bytes_per_second" in metrics
            assert 'lmfleet_replica_state{model="tiny",state="ready",version="v1"} 1.0' in metrics

    run(main())


def test_load_failure_stops_with_an_error(tmp_path):
    async def main():
        async with serving(tmp_path) as (client, rep):
            assert rep.state.value == "stopped" and rep.exit_code == 1
            assert "config.json" in rep.error
            assert (await client.get("/health/ready")).status_code == 503
            assert (await client.get("/state")).json()["error"] == rep.error

    run(main())


def test_too_many_concurrent_requests_get_429(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir, max_concurrent_requests=2) as (client, rep):
            running = [asyncio.create_task(client.post(CHAT, json=long_chat())) for _ in range(2)]
            await wait_for(lambda: rep.in_flight_requests == 2)
            err = assert_error(
                await client.post(CHAT, json=chat_body()),
                429,
                "too_many_requests",
                retry_after=True,
            )
            assert err["type"] == "rate_limit_error"
            done = await asyncio.gather(*running)
            assert [r.status_code for r in done] == [200, 200]
            assert all(r.json()["usage"]["completion_tokens"] == 200 for r in done)
            assert (await client.post(CHAT, json=chat_body(max_tokens=2))).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'reason="too_many_requests"' in metrics

    run(main())


def test_waiting_queue_limit_gets_429(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir, max_num_seqs=1, max_waiting_requests=1) as (client, rep):
            running = [asyncio.create_task(client.post(CHAT, json=long_chat())) for _ in range(2)]
            await wait_for(lambda: rep.in_flight_seqs == 2)  # one runs, one waits
            assert_error(
                await client.post(CHAT, json=chat_body()), 429, "queue_full", retry_after=True
            )
            # n=2 alone would make two wait: refused too
            assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200]
            assert_error(
                await client.post(CHAT, json=chat_body(n=3, max_tokens=2)), 429, "queue_full"
            )
            assert (await client.post(CHAT, json=chat_body(n=2, max_tokens=2))).status_code == 200

    run(main())


def test_drain_finishes_running_requests_and_refuses_new_ones(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir) as (client, rep):
            stopped = []
            rep.on_stopped = lambda: stopped.append(True)
            running = [
                asyncio.create_task(client.post(CHAT, json=long_chat(150))) for _ in range(3)
            ]
            await wait_for(lambda: rep.in_flight_requests == 3)
            r = await client.post("/admin/drain")
            assert r.status_code == 202 and r.json()["state"] == "draining"
            assert (await client.post("/admin/drain")).status_code == 200  # already draining
            r = await client.get("/health/ready")
            assert r.status_code == 503 and r.json()["state"] == "draining"
            assert (await client.get("/health/live")).status_code == 200
            assert_error(
                await client.post(CHAT, json=chat_body()), 503, "draining", retry_after=True
            )
            assert_error(
                await client.post("/v1/completions", json={"prompt": "x"}), 503, "draining"
            )
            done = await asyncio.gather(*running)
            for resp in done:
                assert resp.status_code == 200
                body = resp.json()
                assert body["choices"][0]["finish_reason"] == "length"
                assert body["usage"]["completion_tokens"] == 150
            await wait_for(lambda: rep.state.value == "stopped")
            assert stopped == [True] and rep.exit_code == 0

    run(main())


def test_drain_timeout_aborts_the_rest(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir, max_model_len=4096) as (client, rep):
            slow = asyncio.create_task(client.post(CHAT, json=long_chat(3000)))
            stream_req = client.build_request("POST", CHAT, json=long_chat(3000, stream=True))
            streamed = asyncio.create_task(client.send(stream_req))
            await wait_for(lambda: rep.in_flight_requests == 2)
            r = await client.post("/admin/drain", params={"timeout": 0.3})
            assert r.status_code == 202
            # cut short: a retryable 503, or mid-stream an error event, never a
            # finish_reason outside OpenAI's enum
            resp = await slow
            assert_error(resp, 503, "aborted", retry_after=True)
            sresp = await streamed
            text = (await sresp.aread()).decode()
            assert '"code":"aborted"' in text and text.endswith("data: [DONE]\n\n")
            assert '"finish_reason":"abort"' not in text
            await wait_for(lambda: rep.state.value == "stopped")
            metrics = (await client.get("/metrics")).text
            assert 'lmfleet_request_success_total{finished_reason="abort"' in metrics

    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync-steps", "async-steps"])
def test_sleep_and_wake(tiny_model_dir, async_scheduling):
    async def main():
        async with serving(tiny_model_dir, async_scheduling=async_scheduling) as (client, rep):
            before = (await client.post(CHAT, json=chat_body(max_tokens=5, temperature=0))).json()
            # a request in flight: sleep refuses
            running = asyncio.create_task(client.post(CHAT, json=long_chat(100)))
            await wait_for(lambda: rep.in_flight_requests == 1)
            err = assert_error(await client.post("/admin/sleep"), 409, "invalid_state")
            assert "in flight" in err["message"]
            assert rep.state.value == "ready"
            assert (await running).status_code == 200

            r = await client.post("/admin/sleep")
            assert r.status_code == 200, r.text
            state = r.json()
            assert state["state"] == "asleep" and state["sleep_seconds"] >= 0
            assert state["last_sleep_seconds"] == state["sleep_seconds"]
            assert (await client.get("/health/ready")).status_code == 503
            assert (await client.get("/health/live")).status_code == 200
            assert_error(await client.post(CHAT, json=chat_body()), 503, "asleep", retry_after=True)
            assert (await client.post("/admin/sleep")).status_code == 200  # idempotent
            await wait_for(lambda: rep.stats().asleep)

            r = await client.post("/admin/wake")
            assert r.status_code == 200 and r.json()["state"] == "ready"
            assert r.json()["last_wake_seconds"] is not None
            assert (await client.get("/health/ready")).status_code == 200
            after = (await client.post(CHAT, json=chat_body(max_tokens=5, temperature=0))).json()
            assert after["choices"][0]["message"] == before["choices"][0]["message"]
            metrics = (await client.get("/metrics")).text
            assert 'lmfleet_sleep_seconds{model="tiny",version="v1"}' in metrics
            assert 'lmfleet_wakes_total{model="tiny",version="v1"} 1.0' in metrics
            # wake while ready: nothing to do; sleep while draining: refused
            assert (await client.post("/admin/wake")).status_code == 200
            await client.post("/admin/drain")
            assert_error(await client.post("/admin/sleep"), 409, "invalid_state")

    run(main())


def test_api_key_and_admin_token(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir, api_key="sk-good", admin_token="adm") as (client, _):
            good = {"Authorization": "Bearer sk-good"}
            for headers in ({}, {"Authorization": "Bearer sk-bad"}, {"Authorization": "sk-good"}):
                r = await client.post(CHAT, json=chat_body(max_tokens=2), headers=headers)
                err = assert_error(r, 401, "invalid_api_key")
                assert err["type"] == "invalid_request_error"
            r = await client.get("/v1/models", headers=good)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
            assert (
                await client.post(CHAT, json=chat_body(max_tokens=2), headers=good)
            ).status_code == 200
            # the API key is not the admin token
            assert_error(await client.post("/admin/sleep", headers=good), 401, "invalid_api_key")
            r = await client.post("/admin/sleep", headers={"Authorization": "Bearer adm"})
            assert r.status_code == 200
            # probes, state and metrics stay open
            for path in ("/health/live", "/state", "/metrics"):
                assert (await client.get(path)).status_code == 200

    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync-steps", "async-steps"])
@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees_blocks(tiny_model_dir, stream, async_scheduling):
    """Cancelling the client mid-request (in-process stand-in for a dropped connection)."""

    async def main():
        settings = {"max_model_len": 4096, "async_scheduling": async_scheduling}
        async with serving(tiny_model_dir, **settings) as (client, rep):
            task = asyncio.create_task(client.post(CHAT, json=long_chat(3000, stream=stream)))
            await wait_for(lambda: (s := rep.stats()) is not None and s.num_running == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_for(lambda: rep.in_flight_requests == 0, timeout=30)
            await wait_for(
                lambda: (s := rep.stats()).num_running == 0 and s.num_free_blocks == s.num_blocks,
                timeout=30,
            )

    run(main())


def test_sse_framing_request_id_and_continuous_usage(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir) as (client, _):
            body = long_chat(
                5, n=2, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
            )  # fmt: skip
            r = await client.post(CHAT, json=body, headers={"X-Request-Id": "trace-1"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "trace-1"
            assert r.headers["content-type"].startswith("text/event-stream")
            events = r.text.split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
            assert all(e.startswith("data: ") for e in events[:-1])
            assert {c["id"] for c in chunks} == {chunks[0]["id"]}
            roles = [c["choices"][0]["delta"] for c in chunks[:2]]
            assert roles == [{"role": "assistant", "content": ""}] * 2
            by_choice = {0: 0, 1: 0}
            for c in chunks[2:-1]:
                assert c["usage"] is not None  # continuous usage
                by_choice[c["choices"][0]["index"]] += 1
            assert by_choice[0] >= 1 and by_choice[1] >= 1
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10

            r = await client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "abc", "max_tokens": 3, "echo": True,
                      "stream": True, "temperature": 0},
            )  # fmt: skip
            first = json.loads(r.text.split("\n\n")[0].removeprefix("data: "))
            assert first["choices"][0]["text"] == "abc"

    run(main())
