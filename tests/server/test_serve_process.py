"""``lmfleet serve`` as a real process, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.processes import ServeProcess, launch_serve, stop_all, wait_ready

pytestmark = pytest.mark.integration

API_KEY = "sk-test"
ADMIN = "admin-secret"


Server = ServeProcess


def _launch(model_dir: Path, log_dir: Path, *flags: str) -> Server:
    return launch_serve(
        str(model_dir), log_dir,
        "--device", "cpu", "--served-model-name", "tiny", "--api-key", API_KEY,
        "--admin-token", ADMIN, "--kv-cache-memory", "8Mi", "--max-model-len", "1024",
        *flags, api_key=API_KEY,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Three replicas started at once (process start dominates these tests): one shared
    by the API tests, one for backpressure, one to drain with SIGTERM."""
    log_dir = tmp_path_factory.mktemp("serve")
    servers = {
        "main": _launch(tiny_model_dir, log_dir),
        "limited": _launch(tiny_model_dir, log_dir, "--max-concurrent-requests", "2"),
        "drain": _launch(tiny_model_dir, log_dir, "--drain-timeout", "60"),
    }
    try:
        for s in servers.values():
            wait_ready(s, live_first=True)
        yield servers
    finally:
        stop_all(servers.values())


@pytest.fixture
def server(fleet) -> Server:
    return fleet["main"]


def _greedy(**kw):
    return {"temperature": 0, **kw}


# ---- the OpenAI API through the official client ------------------------------------------
def test_models_and_chat(server):
    with server.client() as client:
        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert client.models.retrieve("tiny").id == "tiny"
        resp = client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_tokens=8,
            user="u-1",
            extra_body={"ignore_eos": True},
            **_greedy(),
        )
        assert resp.object == "chat.completion" and resp.model == "tiny"
        choice = resp.choices[0]
        assert choice.finish_reason == "length" and choice.message.role == "assistant"
        assert isinstance(choice.message.content, str) and choice.message.content
        assert resp.usage.completion_tokens == 8
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_completions_and_vllm_extras(server):
    with server.client() as client:
        resp = client.completions.create(
            model="tiny",
            prompt="The fleet",
            max_tokens=6,
            extra_body={
                "top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1,
                "ignore_eos": True, "min_tokens": 6,
            },
            presence_penalty=0.5,
            frequency_penalty=0.5,
            top_p=0.9,
            temperature=0.8,
            seed=1,
        )  # fmt: skip
        assert resp.object == "text_completion"
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens == 6
        batch = client.completions.create(
            model="tiny", prompt=["one", "two three"], max_tokens=3, n=2, **_greedy()
        )
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert batch.choices[0].text == batch.choices[1].text  # greedy, same prompt
        echo = client.completions.create(
            model="tiny", prompt="echo me", max_tokens=2, echo=True, **_greedy()
        )
        assert echo.choices[0].text.startswith("echo me")


def test_streaming_with_usage_matches_non_streaming(server):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "Count"}], "max_tokens": 12}
    with server.client() as client:
        full = client.chat.completions.create(**kw, **_greedy(), extra_body={"ignore_eos": True})
        chunks = list(
            client.chat.completions.create(
                **kw, **_greedy(), stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
        assert all(c.usage is None for c in chunks[:-1])

        stream = client.completions.create(
            model="tiny", prompt="Count", max_tokens=5, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **_greedy(),
        )  # fmt: skip
        parts = list(stream)
        assert parts[-1].usage.completion_tokens == 5
        assert parts[-2].choices[0].finish_reason == "length"


def test_n_seed_and_logprobs(server):
    msgs = [{"role": "user", "content": "Pick"}]
    with server.client() as client:
        a = client.chat.completions.create(
            model="tiny", messages=msgs, n=2, seed=42, temperature=1.0, max_tokens=10,
            logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
        )  # fmt: skip
        b = client.chat.completions.create(
            model="tiny", messages=msgs, n=2, seed=42, temperature=1.0, max_tokens=10,
            logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.index for c in a.choices] == [0, 1]
        assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
        assert a.choices[0].message.content != a.choices[1].message.content  # seeds 42, 43
        assert a.usage.completion_tokens == 20
        lp = a.choices[0].logprobs.content
        assert len(lp) == 10 and all(len(t.top_logprobs) == 3 for t in lp)
        assert "".join(t.token for t in lp) == a.choices[0].message.content
        assert all(t.logprob <= 0 for t in lp)
        c = client.chat.completions.create(
            model="tiny",
            messages=msgs,
            seed=7,
            temperature=1.0,
            max_tokens=10,
            extra_body={"ignore_eos": True},
        )
        assert c.choices[0].message.content != a.choices[0].message.content

        cmpl = client.completions.create(
            model="tiny", prompt="Pick", max_tokens=4, logprobs=2, **_greedy(),
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        lps = cmpl.choices[0].logprobs
        assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == 4
        assert "".join(lps.tokens) == cmpl.choices[0].text
        assert lps.text_offset[0] == 0


def test_stop_strings(server):
    msgs = [{"role": "user", "content": "Say something"}]
    with server.client() as client:
        base = (
            client.chat.completions.create(
                model="tiny",
                messages=msgs,
                max_tokens=30,
                extra_body={"ignore_eos": True},
                **_greedy(),
            )
            .choices[0]
            .message.content
        )
        stop = base[len(base) // 2 : len(base) // 2 + 2]
        assert stop
        cut = client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=30, stop=[stop],
            extra_body={"ignore_eos": True}, **_greedy(),
        )  # fmt: skip
        choice = cut.choices[0]
        assert choice.finish_reason == "stop"
        assert base.startswith(choice.message.content)
        assert stop not in choice.message.content and len(choice.message.content) < len(base)


def test_tokenize_and_detokenize(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(
        f"{server.url}/tokenize", json={"model": "tiny", "prompt": "hello world"}, headers=headers
    )
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    r = httpx.post(
        f"{server.url}/detokenize",
        json={"model": "tiny", "tokens": body["tokens"]},
        headers=headers,
    )
    assert r.json()["prompt"] == "hello world"
    chat = httpx.post(
        f"{server.url}/tokenize",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    ).json()
    assert chat["count"] > 3


def test_errors_through_the_client(server):
    with server.client() as client:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0
            )
        assert exc.value.param == "max_tokens" if hasattr(exc.value, "param") else True
        assert exc.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        # unknown fields are ignored (refused only under --strict-request-fields)
        ok = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
            extra_body={"foo": 1},
        )  # fmt: skip
        assert ok.choices[0].finish_reason in ("stop", "length")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.models.list()
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"


def test_client_disconnect_frees_kv_blocks(server):
    body = {
        "model": "tiny", "messages": [{"role": "user", "content": "Go on"}],
        "max_tokens": 900, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()  # (leaving a for loop over it would close the connection)
        data = [
            line for line, _ in zip(lines, range(10), strict=False) if line.startswith("data: ")
        ]
        assert len(data) == 5
        mid = server.state()
        assert mid["running"] == 1 and mid["kv_blocks_in_use"] > 0
    # the connection is closed here, mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = server.state()
        if st["kv_blocks_in_use"] == 0 and st["running"] == 0 and st["in_flight_requests"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"blocks not freed: {server.state()}")


def test_sleep_and_wake(server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{server.url}/admin/sleep").status_code == 401
    r = httpx.post(f"{server.url}/admin/sleep", headers=admin)
    assert r.status_code == 200 and r.json()["state"] == "asleep"
    assert httpx.get(f"{server.url}/health/ready").status_code == 503
    st = server.state()
    assert st["state"] == "asleep" and st["last_sleep_seconds"] is not None
    with server.client() as client, pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert exc.value.status_code == 503
    r = httpx.post(f"{server.url}/admin/wake", headers=admin)
    assert r.status_code == 200 and r.json()["state"] == "ready"
    assert r.json()["last_wake_seconds"] is not None
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "lmfleet_sleep_seconds" in metrics and "lmfleet_wake_seconds" in metrics
    with server.client() as client:
        out = client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert out.usage.completion_tokens <= 2


# ---- backpressure and drain, each on its own process ---------------------------------------
STREAM_TOKENS = 200


async def _stream(aclient: openai.AsyncOpenAI, started: asyncio.Event, i: int):
    """One long stream; returns (finish_reason, usage, tokens counted on the client)."""
    stream = await aclient.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": f"stream {i}"}],
        max_tokens=STREAM_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,  # one entry per token: lets the client count what it received
        extra_body={"ignore_eos": True},
        **_greedy(),
    )
    finish, usage, tokens = None, None, 0
    async for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            tokens += len(choice.logprobs.content) if choice.logprobs else 0
            finish = choice.finish_reason or finish
            if tokens:
                started.set()
        if chunk.usage is not None:
            usage = chunk.usage
    return finish, usage, tokens


async def _all_streaming(started: list[asyncio.Event], tasks: list[asyncio.Task]) -> None:
    """Until every stream has received a token (each one admitted and running), or
    fail with the first stream that ended before that."""
    waiter = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started)))
    done, _ = await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        for task in done:
            task.result()  # a stream's own error
        raise AssertionError(f"not every stream was running after 60 s ({len(done)} ended)")


async def _refused(aclient: openai.AsyncOpenAI) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as exc:
        await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    return exc.value


def _rejected(srv: Server, reason: str) -> float:
    """``lmfleet_request_rejected_total`` for ``reason`` (0 when absent)."""
    text = httpx.get(f"{srv.url}/metrics").text
    pattern = rf'^lmfleet_request_rejected_total{{[^}}]*reason="{reason}"[^}}]*}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_backpressure_429_then_idle_sigterm_exits_zero(fleet):
    srv = fleet["limited"]  # --max-concurrent-requests 2

    async def main():
        async with srv.aclient() as aclient:
            started = [asyncio.Event() for _ in range(2)]
            tasks = [asyncio.create_task(_stream(aclient, e, i)) for i, e in enumerate(started)]
            await _all_streaming(started, tasks)
            err = await _refused(aclient)
            assert isinstance(err, openai.RateLimitError) and err.code == "too_many_requests"
            assert err.response.headers["retry-after"] == "1"
            # answered at admission, not queued: it never reached the engine
            assert err.response.headers["x-lmfleet-admitted"] == "0"
            return await asyncio.gather(*tasks)

    for finish, usage, tokens in asyncio.run(main()):
        assert (finish, usage.completion_tokens, tokens) == ("length", STREAM_TOKENS, STREAM_TOKENS)
    assert _rejected(srv, "too_many_requests") == 1
    # idle now: SIGTERM stops it at once (nothing to wait for), with status 0
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) == 0, srv.logs()
    logs = srv.logs()
    assert "draining: 0 requests in flight" in logs and "drained: every request finished" in logs
    assert "drain timeout" not in logs


def test_sigterm_drains_mid_way_streams_and_exits_zero(fleet):
    srv = fleet["drain"]  # --drain-timeout 60

    async def main():
        async with srv.aclient() as aclient, httpx.AsyncClient(base_url=srv.url) as http:
            started = [asyncio.Event() for _ in range(4)]
            tasks = [asyncio.create_task(_stream(aclient, e, i)) for i, e in enumerate(started)]
            await _all_streaming(started, tasks)
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while (await http.get("/health/ready")).status_code != 503:
                assert time.monotonic() < deadline, "never stopped being ready"
                await asyncio.sleep(0.02)
            assert (await http.get("/state")).json()["state"] == "draining"
            assert (await http.get("/health/live")).status_code == 200
            err = await _refused(aclient)
            assert err.status_code == 503 and err.code == "draining"
            assert err.response.headers["retry-after"] == "1"
            return await asyncio.gather(*tasks)

    for finish, usage, tokens in asyncio.run(main()):
        assert (finish, usage.completion_tokens, tokens) == ("length", STREAM_TOKENS, STREAM_TOKENS)
    assert srv.proc.wait(timeout=60) == 0, srv.logs()
    logs = srv.logs()
    assert "SIGTERM received: draining" in logs and "drained: every request finished" in logs
    # the count the server took when the drain began: all four streams were mid-way
    assert "draining: 4 requests in flight" in logs, logs
