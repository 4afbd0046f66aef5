from __future__ import annotations

import asyncio
import socket

import pytest

from lmfleet.bench.client import Target, build_payload, make_client, resolve_model, stream_request
from lmfleet.bench.metrics import RequestRecord
from lmfleet.errors import ConfigError
from tests.bench.servers import FakeOpenAI, ServerThread


def one(target: Target, max_tokens: int = 5, prompt: str = "a b c") -> RequestRecord:
    async def go() -> RequestRecord:
        record = RequestRecord(index=0, scheduled_time=0.0, input_len=3, output_len=max_tokens)
        async with make_client(timeout_s=target.timeout_s) as client:
            payload = build_payload(target, prompt, max_tokens)
            await stream_request(client, target, payload, record, run_start=0.0)
        return record

    return asyncio.run(go())


def test_payload() -> None:
    t = Target("http://x", "m", extra_body={"top_p": 0.5})
    body = build_payload(t, "hi", 7)
    assert body["prompt"] == "hi" and body["max_tokens"] == 7 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["top_p"] == 0.5
    chat = build_payload(Target("http://x", "m", chat=True, ignore_eos=False), "hi", 7)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in chat
    assert Target("http://x/", "m", chat=True).url == "http://x/v1/chat/completions"
    assert Target("http://x", "m", endpoint="/generate").url == "http://x/generate"


def test_timing_matches_the_server_pace(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.ttft_s, fake.gap_s = 0.05, 0.02
    r = one(Target(fake_server.url, "ok"), max_tokens=11)
    assert r.success and r.error is None and r.status == 200
    assert r.output_tokens == 11 and len(r.chunk_times) == 11 and r.prompt_tokens == 3
    assert 0.05 <= r.ttft < 0.05 + 0.04
    assert r.tpot == pytest.approx(0.02, abs=0.006)
    assert sorted(r.itls)[5] == pytest.approx(0.02, abs=0.006)
    assert fake.bodies[0]["ignore_eos"] is True


def test_tokens_from_usage_or_chunks(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.gap_s, fake.tokens_per_chunk = 0.001, 3
    r = one(Target(fake_server.url, "ok"), max_tokens=10)
    assert len(r.chunk_times) == 4 and r.output_tokens == 10  # usage wins
    fake.usage = False
    r = one(Target(fake_server.url, "ok"), max_tokens=10)
    assert r.output_tokens == 4  # no usage: one token per chunk


def test_chat_endpoint(fake: FakeOpenAI, fake_server: ServerThread) -> None:
    fake.gap_s = 0.001
    r = one(Target(fake_server.url, "ok", chat=True), max_tokens=6)
    assert r.success and r.output_tokens == 6 and len(r.chunk_times) == 6
    assert fake.bodies[0]["messages"][0]["role"] == "user"


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("status-503", "http_503"),
        ("disconnect", "disconnect"),
        ("truncated", "disconnect"),
        ("bad-json", "bad_response"),
        ("stream-error", "stream_error"),
        ("hang", "timeout"),
    ],
)
def test_errors_by_type(
    fake: FakeOpenAI, fake_server: ServerThread, model: str, error: str
) -> None:
    fake.ttft_s = fake.gap_s = 0.001
    r = one(Target(fake_server.url, model, timeout_s=0.5), max_tokens=5)
    assert not r.success
    assert r.error == error, r.error_detail
    assert r.latency is not None and r.latency < 5
    if model == "status-503":
        assert r.status == 503 and "draining" in r.error_detail


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: refused, and ours meanwhile
        port = s.getsockname()[1]
        r = one(Target(f"http://127.0.0.1:{port}", "m", timeout_s=2.0))
    assert r.error == "connect" and not r.success


def test_server_closing_before_any_response() -> None:
    async def go() -> RequestRecord:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.close()

        server = await asyncio.start_server(slam, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = Target(f"http://127.0.0.1:{port}", "m", timeout_s=5.0)
        record = RequestRecord(index=0, scheduled_time=0.0, input_len=1, output_len=1)
        async with server, make_client() as client:
            await stream_request(
                client, target, build_payload(target, "x", 1), record, run_start=0.0
            )
        return record

    r = asyncio.run(go())
    assert r.error == "disconnect_before_response" and r.status is None


def test_resolve_model(fake_server: ServerThread) -> None:
    async def go(url: str) -> str:
        async with make_client() as client:
            return await resolve_model(client, url)

    assert asyncio.run(go(fake_server.url)) == "fake-model"
    with socket.socket() as s, pytest.raises(ConfigError, match="is the server up"):
        s.bind(("127.0.0.1", 0))  # bound, never listening: refused, and ours meanwhile
        asyncio.run(go(f"http://127.0.0.1:{s.getsockname()[1]}"))


def test_many_concurrent_streams() -> None:
    fake = FakeOpenAI(ttft_s=0.2, gap_s=0.05)
    with ServerThread(fake.app()) as server:

        async def go() -> list[RequestRecord]:
            target = Target(server.url, "ok")
            records = [RequestRecord(i, 0.0, 3, 4) for i in range(100)]
            async with make_client() as client:
                await asyncio.gather(
                    *(
                        stream_request(
                            client, target, build_payload(target, "x", 4), r, run_start=0.0
                        )
                        for r in records
                    )
                )
            return records

        records = asyncio.run(go())
    assert all(r.success for r in records)
    assert fake.max_running == 100  # the pool did not queue any stream
