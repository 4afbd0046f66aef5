"""Issue 16, part 1, in-process: a query of death answers 4xx/5xx for itself alone,
and the replica keeps serving (the engine stays alive, its KV blocks come back)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmfleet.engine.faults import fault_request_id

from .conftest import serving, wait_for

COMPLETIONS = "/v1/completions"
PROMPTS = ["Hello there", "The fleet", "Ünïcödé text", "a b c d e f"]


def run(coro):
    return asyncio.run(coro)


def _body(prompt: str, **extra) -> dict:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def _blocks_all_free(client) -> dict:
    state: dict = {}

    async def refresh() -> None:
        nonlocal state
        state = (await client.get("/state")).json()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    await refresh()
    while state["kv_blocks_free"] != state["kv_blocks_total"] or state["running"]:
        assert loop.time() < deadline, f"KV blocks not freed: {state}"
        await asyncio.sleep(0.02)
        await refresh()
    return state


@pytest.mark.parametrize(
    "seed",
    [18446744073709551616, 2**63, -(2**63) - 1],
    ids=["2**64", "2**63", "below-int64"],
)
def test_seed_outside_int64_answers_400_and_the_replica_keeps_serving(tiny_model_dir, seed):
    """Before the fix: 503 engine_dead, then 503 for every request and /health/live."""

    async def main():
        async with serving(tiny_model_dir) as (client, rep):
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": seed}
            for stream in (False, True):
                r = await client.post(COMPLETIONS, json={**body, "stream": stream})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == "seed"
            ok = await client.post(COMPLETIONS, json=_body("hi", seed=2**63 - 1))
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["completion_tokens"] == 12
            assert (await client.get("/health/live")).status_code == 200
            assert not rep.engine_dead

    run(main())


async def _stream_events(client, body: dict) -> tuple[int, list]:
    events = []
    async with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return r.status_code, events


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
@pytest.mark.parametrize("stage", ["sample", "output"])
def test_fault_in_one_request_of_a_running_batch_fails_it_alone(
    tiny_model_dir, engine_process, stage
):
    async def main():
        settings = {"fault_injection": True, "engine_process": engine_process}
        async with serving(tiny_model_dir, **settings) as (client, _):
            expected = [
                (await client.post(COMPLETIONS, json=_body(p))).json()["choices"][0]["text"]
                for p in PROMPTS
            ]
            faulty = fault_request_id(stage, 3)
            results = await asyncio.gather(
                _stream_events(client, _body("the faulty one", request_id=faulty)),
                client.post(COMPLETIONS, json=_body("the faulty one", request_id=faulty + "-b")),
                *(client.post(COMPLETIONS, json=_body(p)) for p in PROMPTS),
            )
            (status, events), plain, *others = results
            # streamed: 3 tokens, then an error event, then [DONE]
            assert status == 200
            tokens = "".join(e["choices"][0]["text"] for e in events[:-2] if "choices" in e)
            assert tokens and events[-1] == "[DONE]"
            assert events[-2]["error"]["code"] == "request_failed", events[-2]
            assert plain.status_code == 500 and plain.json()["error"]["code"] == "request_failed"
            for r, text in zip(others, expected, strict=True):
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == text
                assert r.json()["usage"]["completion_tokens"] == 12
            state = await _blocks_all_free(client)
            assert not state["engine_dead"]
            assert (await client.get("/health/live")).status_code == 200
            again = await client.post(COMPLETIONS, json=_body(PROMPTS[0]))
            assert again.json()["choices"][0]["text"] == expected[0]

    run(main())


def test_fault_ids_do_nothing_without_the_opt_in(tiny_model_dir):
    async def main():
        async with serving(tiny_model_dir) as (client, _):
            for stage in ("sample", "output", "step"):
                body = _body("x", request_id=fault_request_id(stage))
                r = await client.post(COMPLETIONS, json=body)
                assert r.status_code == 200, r.text
            assert (await client.get("/health/live")).status_code == 200

    run(main())


def test_dead_engine_fails_liveness_then_stops_with_an_error(tiny_model_dir):
    async def main():
        async with serving(
            tiny_model_dir, fault_injection=True, exit_on_engine_dead_after_s=0.2
        ) as (client, rep):
            stopped = asyncio.Event()
            rep.on_stopped = stopped.set
            r = await client.post(COMPLETIONS, json=_body("x", request_id=fault_request_id("step")))
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert "x-lmfleet-admitted" not in r.headers  # this one reached the engine
            assert (await client.get("/health/live")).status_code == 503
            # later requests are refused before the engine, and say so (the gateway
            # may then try them elsewhere)
            r = await client.post(COMPLETIONS, json=_body("x"))
            assert r.status_code == 503 and r.headers["x-lmfleet-admitted"] == "0"
            await wait_for(stopped.is_set, timeout=30)
            assert rep.state.value == "stopped" and rep.exit_code == 1
            assert "engine died" in (rep.error or "")

    run(main())
