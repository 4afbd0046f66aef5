"""The gateway's upstream HTTP/1.1 client against small raw servers that misbehave on
purpose: keep-alive reuse, the keep-alive race, errors by kind, flow control."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from lmfleet.gateway.upstream import (
    ConnectFailed,
    Disconnected,
    Origin,
    UpstreamPool,
    UpstreamProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request_head(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    return head.split(b"\r\n")[0].decode(), body


def _chunked(*pieces: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    """A raw server running ``handler`` per connection; a client closing the
    connection (a request head cut short) just ends the handler."""

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _stop(server: asyncio.Server, pool: UpstreamPool | None = None) -> None:
    if pool is not None:
        await pool.aclose()
    server.close()
    await asyncio.sleep(0.05)  # let the handlers see their connections close
    await server.wait_closed()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_origin_parsing():
    assert Origin.parse("http://h:81/base/") == Origin("http", "h", 81, "/base")
    assert Origin.parse("https://h").port == 443
    assert Origin.parse("http://h:80").host_header == "h"
    assert Origin.parse("http://[::1]:9").host_header == "[::1]:9"
    with pytest.raises(ValueError, match="not an http"):
        Origin.parse("ftp://h")


def test_streamed_body_in_pieces_and_keep_alive_reuse():
    seen: list[tuple[str, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _request_head(reader))
            writer.write(_SSE_HEAD)
            for piece in _chunked(b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)

    async def main() -> None:
        server, url = await _serve(handler)
        pool = UpstreamPool()
        for i in range(3):
            resp = await pool.request(
                url, "/v1/completions", b'{"i": %d}' % i, [("x-request-id", "r")],
                connect_timeout=5, head_timeout=5,
            )  # fmt: skip
            assert resp.status == 200
            assert resp.headers["content-type"] == "text/event-stream"
            body = b""
            while (chunk := await resp.next_chunk(5)) is not None:
                body += chunk
            assert body == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
            resp.close()
        assert pool.opened == 1  # one connection served all three
        assert [s[0] for s in seen] == ["POST /v1/completions HTTP/1.1"] * 3
        assert [s[1] for s in seen] == [b'{"i": 0}', b'{"i": 1}', b'{"i": 2}']
        await _stop(server, pool)

    run(main())


def test_finish_returns_the_connection_after_done():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request_head(reader)
            writer.write(_SSE_HEAD + _chunked(b"data: [DONE]\n\n")[0])
            await writer.drain()
            await asyncio.sleep(0.05)  # the last chunk comes later
            writer.write(b"0\r\n\r\n")

    async def main() -> None:
        server, url = await _serve(handler)
        pool = UpstreamPool()
        for _ in range(2):
            resp = await pool.request(url, "/x", b"{}", [], connect_timeout=5, head_timeout=5)
            assert await resp.next_chunk(5) == b"data: [DONE]\n\n"
            await resp.finish(2.0)
        assert pool.opened == 1
        # closing before the end of the body costs the connection
        resp = await pool.request(url, "/x", b"{}", [], connect_timeout=5, head_timeout=5)
        await resp.next_chunk(5)
        resp.close()
        resp = await pool.request(url, "/x", b"{}", [], connect_timeout=5, head_timeout=5)
        resp.close()
        assert pool.opened == 2
        await _stop(server, pool)

    run(main())


def test_a_reused_connection_closed_by_the_server_is_retried_on_a_fresh_one():
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if first:  # keep-alive promised, then the idle connection is dropped
            with contextlib.suppress(asyncio.IncompleteReadError):
                await _request_head(reader)
            writer.close()

    async def main() -> None:
        server, url = await _serve(handler)
        pool = UpstreamPool()
        assert await pool.fetch(url, "/a", timeout=5) == (200, b"ok")
        assert await pool.fetch(url, "/b", timeout=5) == (200, b"ok")
        assert pool.opened == 2
        await _stop(server, pool)

    run(main())


def test_idle_connections_expire():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request_head(reader)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        server, url = await _serve(handler)
        pool = UpstreamPool(idle_s=0.05)
        assert await pool.fetch(url, "/", method="GET", timeout=5) == (204, b"")
        await asyncio.sleep(0.1)
        assert await pool.fetch(url, "/", method="GET", timeout=5) == (204, b"")
        assert pool.opened == 2
        await _stop(server, pool)

    run(main())


def test_errors_by_kind():
    async def cut_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(_SSE_HEAD + _chunked(b"data: 1\n\n")[0])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"SPDY/9 nonsense\r\n\r\n")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        await reader.read()  # until the client gives up

    async def main() -> None:
        pool = UpstreamPool()
        server, url = await _serve(cut_mid_body)
        resp = await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=5)
        assert await resp.next_chunk(5) == b"data: 1\n\n"
        with pytest.raises(Disconnected):
            await resp.next_chunk(5)
        resp.close()
        await _stop(server)

        server, url = await _serve(garbage)
        with pytest.raises(UpstreamProtocolError):
            await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=5)
        await _stop(server)

        server, url = await _serve(silent)
        with pytest.raises(TimeoutError):
            await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=0.1)
        await _stop(server)

        server, url = await _serve(silent)
        await _stop(server)
        with pytest.raises(ConnectFailed):
            await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=5)
        await pool.aclose()

    run(main())


def test_a_slow_reader_pauses_the_replica_and_loses_nothing():
    piece = bytes(range(256)) * 256  # 64 KiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(_SSE_HEAD)
        for p in _chunked(*[piece] * 32):  # 2 MiB
            writer.write(p)
            await writer.drain()

    async def main() -> None:
        server, url = await _serve(handler)
        pool = UpstreamPool()
        resp = await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=5)
        got = b""
        while (chunk := await resp.next_chunk(5)) is not None:
            got += chunk
            await asyncio.sleep(0.01)  # the client on the other side is slow
        assert got == piece * 32
        resp.close()
        await _stop(server, pool)

    run(main())


def test_idle_timeout_counts_from_the_last_bytes_not_from_each_read():
    async def trickle_then_silence(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await _request_head(reader)
        writer.write(_SSE_HEAD)
        for _ in range(8):  # a chunk every 0.1 s: never idle for 0.3 s
            writer.write(_chunked(b"data: x\n\n")[0])
            await writer.drain()
            await asyncio.sleep(0.1)
        await reader.read()  # then silence until the client gives up

    async def main() -> None:
        server, url = await _serve(trickle_then_silence)
        pool = UpstreamPool()
        resp = await pool.request(url, "/", b"{}", [], connect_timeout=5, head_timeout=5)
        got = b""
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            while True:
                chunk = await resp.next_chunk(0.3)
                assert chunk is not None
                got += chunk
                last = loop.time()
        assert got == b"data: x\n\n" * 8
        assert 0.25 <= loop.time() - last < 1.0
        resp.close()
        await _stop(server, pool)

    run(main())
