"""A lean HTTP/1.1 client for streaming OpenAI-style completions, for the benchmarks.

``benchmarks/gateway.py`` compares streams sent straight to replicas with streams
sent through the gateway, on a machine whose few cores the client shares with the
replicas and the gateway; the less CPU the client spends per token, the less it
disturbs what is measured (the same on both sides). So, instead of httpx:

* an :class:`asyncio.Protocol` per connection, the response parsed by
  ``httptools.HttpResponseParser`` (chunked transfer encoding or content-length);
  one keep-alive connection per :class:`SSEClient`, reused request after request
  (a request that finds its reused connection closed by the server before any
  response byte is sent again once, on a fresh connection);
* the request is one write: a fixed header block and the JSON body;
* server-sent events are split on blank lines; a ``data:`` payload is counted as a
  content chunk without ``json.loads`` when it holds exactly one occurrence of the
  content key of the endpoint (``"text":"`` for completions, ``"delta":{"content":"``
  for chat, as the replicas' template chunks write them) followed by a non-empty
  string (the next byte is not ``"``). Inside a JSON string a ``"`` is escaped, so
  such a match is always the key itself. Everything else (the chat role chunk, a
  finish-only chunk with empty text, a usage-only chunk with ``"choices":[]``, an
  error event, a chunk with logprobs or several choices) is parsed with
  ``json.loads`` and counted the slow, general way: a choice counts when
  ``choices[i].text`` (completions) or ``choices[i].delta.content`` (chat) is a
  non-empty string. The count is therefore exact for any well-formed stream;
  ``python benchmarks/sse_client.py`` runs a self-check against a local server.

A :class:`StreamResult` records the start (``time.perf_counter()`` just before the
connection is opened, when one is, or the request written), the TTFT (the arrival
of the first content chunk: the time of the socket read that delivered it), the
end-to-end time (the end of the HTTP response), the number of content chunks and an
error kind: ``http_<status>``, ``connect``, ``disconnect`` (the connection closed
before the response ended), ``no_done`` (no ``data: [DONE]``), ``stream_error`` (an
event with a top-level ``error``; also an event that is not valid JSON),
``timeout``, ``bad_response`` (not parseable HTTP).

A :class:`Window` counts the content chunks that arrive while it is open, whichever
request they belong to: the throughput of a steady interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httptools

_now = time.perf_counter
_QUOTE = ord('"')
_KEY_TEXT = b'"text":"'
_KEY_CHAT = b'"delta":{"content":"'

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (as uvicorn uses it)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


class Window:
    """Counts content chunks received at ``lo <= t < hi`` (``perf_counter`` seconds).
    Closed (``lo = hi = inf``) until the caller sets ``lo``, then ``hi``."""

    __slots__ = ("hi", "lo", "tokens")

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = math.inf
        self.tokens = 0


@dataclass(slots=True)
class StreamResult:
    t_start: float
    error: str | None = None
    ttft: float | None = None  # seconds from t_start to the first content chunk
    e2e: float | None = None  # seconds from t_start to the end of the response
    tokens: int = 0  # content chunks
    done: bool = False  # saw data: [DONE]


def _data_of(event: bytes) -> bytes | None:
    """The data of a general SSE event (several lines, comments, ``data:`` without a
    space); None without a data field."""
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


class _Exchange:
    """One request/response on a connection; the target of the httptools parser."""

    __slots__ = ("buf", "chat", "complete", "future", "keep_alive", "key", "klen", "now", "parser",
                 "result", "started", "status", "stream_error", "timer", "window")  # fmt: skip

    def __init__(
        self, result: StreamResult, chat: bool, window: Window | None, future: asyncio.Future
    ) -> None:
        self.result = result
        self.chat = chat
        self.key = _KEY_CHAT if chat else _KEY_TEXT
        self.klen = len(self.key)
        self.window = window
        self.future = future
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.buf = b""
        self.now = 0.0
        self.started = False  # a response byte arrived
        self.complete = False
        self.keep_alive = False
        self.stream_error = False
        self.timer: asyncio.TimerHandle | None = None

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            return
        data = self.buf + body if self.buf else body
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        events = data.split(b"\n\n")
        self.buf = events.pop()
        r = self.result
        if r.done:
            return
        key, klen = self.key, self.klen
        n = 0
        for ev in events:
            if ev.startswith(b"data: ") and b"\n" not in ev:
                d = ev[6:]
            else:
                d = _data_of(ev.strip(b"\n"))
                if d is None:
                    continue  # a comment or an event without data
            if d == b"[DONE]":
                r.done = True
                break
            i = d.find(key)
            if i >= 0 and len(d) > i + klen and d[i + klen] != _QUOTE and d.find(key, i + 1) < 0:
                n += 1
            else:
                n += self._slow(d)
        if n:
            if r.ttft is None:
                r.ttft = self.now - r.t_start
            r.tokens += n
            w = self.window
            if w is not None and w.lo <= self.now < w.hi:
                w.tokens += n

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        r = self.result
        if self.status != 200:
            error = f"http_{self.status}"
        elif self.stream_error:
            error = "stream_error"
        elif not r.done:
            error = "no_done"
        else:
            error = None
        self.finish(error)

    # ---- ---------------------------------------------------------------------------------
    def _slow(self, d: bytes) -> int:
        try:
            obj = json.loads(d)
        except ValueError:
            self.stream_error = True
            return 0
        if not isinstance(obj, dict):
            self.stream_error = True
            return 0
        if "error" in obj:
            self.stream_error = True
            return 0
        n = 0
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            if self.chat:
                delta = c.get("delta")
                content = delta.get("content") if isinstance(delta, dict) else None
            else:
                content = c.get("text")
            if isinstance(content, str) and content:
                n += 1
        return n

    def finish(self, error: str | None) -> None:
        if self.future.done():
            return
        if self.timer is not None:
            self.timer.cancel()
        r = self.result
        r.error = error
        r.e2e = _now() - r.t_start
        self.future.set_result(None)


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.complete:  # nothing was asked: not HTTP we understand
            self.open = False
            if self.transport is not None:
                self.transport.close()
            return
        ex.now = _now()
        ex.started = True
        try:
            ex.parser.feed_data(data)
        except httptools.HttpParserError:
            ex.finish("bad_response")
            self.open = False
            if self.transport is not None:
                self.transport.abort()
            return
        if ex.complete:
            self.exchange = None
            if not ex.keep_alive:
                self.open = False
                if self.transport is not None:
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        ex = self.exchange
        self.exchange = None
        if ex is not None and not ex.complete:
            ex.finish("disconnect")


class SSEClient:
    """Streaming POSTs to one server over one keep-alive connection, one at a time."""

    def __init__(self, base_url: str, timeout: float = 300.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http://host:port URL, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._host_header = f"{self.host}:{self.port}"
        self._conn: _Conn | None = None
        self.connections = 0  # opened so far

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Conn, self.host, self.port), self.timeout
        )
        self.connections += 1
        self._conn = conn
        return conn

    async def post(
        self, path: str, payload: dict[str, Any] | bytes, *, window: Window | None = None
    ) -> StreamResult:
        """POST ``payload`` (JSON) to ``path`` and read the event stream to its end.
        ``/chat/completions`` paths count ``delta.content``, others ``text``."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        full = self.prefix + path
        request = (
            f"POST {full} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        chat = path.endswith("/chat/completions")
        loop = asyncio.get_running_loop()
        result = StreamResult(t_start=_now())
        for attempt in range(2):
            conn = self._conn
            reused = conn is not None and conn.open and not conn.transport.is_closing()
            if not reused:
                try:
                    conn = await self._connect()
                except (OSError, TimeoutError):
                    result.error = "connect"
                    result.e2e = _now() - result.t_start
                    return result
            assert conn is not None and conn.transport is not None
            ex = _Exchange(result, chat, window, loop.create_future())
            ex.timer = loop.call_at(
                loop.time() + self.timeout - (_now() - result.t_start), self._expire, conn, ex
            )
            conn.exchange = ex
            conn.transport.write(request)
            await ex.future
            if result.error == "disconnect" and reused and not ex.started and attempt == 0:
                result.error = None  # the server closed the idle connection: once more
                continue
            return result
        return result  # pragma: no cover

    @staticmethod
    def _expire(conn: _Conn, ex: _Exchange) -> None:
        ex.timer = None
        ex.finish("timeout")
        conn.exchange = None
        conn.open = False
        if conn.transport is not None:
            conn.transport.abort()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.open = False
            conn.transport.close()


# ---- self-check -----------------------------------------------------------------------------
def _completion_event(text: str, finish: str | None = None) -> bytes:
    reason = json.dumps(finish)
    return (
        'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
        f'"choices":[{{"index":0,"text":{json.dumps(text)},"logprobs":null,'
        f'"finish_reason":{reason},"stop_reason":null}}],"usage":null,'
        '"system_fingerprint":null}\n\n'
    ).encode()


def _chat_event(text: str | None, finish: str | None = None) -> bytes:
    delta = f'{{"content":{json.dumps(text)}}}' if text else "{}"
    return (
        'data: {"id":"chat-1","object":"chat.completion.chunk","created":1,"model":"m",'
        f'"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
        f'"finish_reason":{json.dumps(finish)},"stop_reason":null}}],"usage":null,'
        '"system_fingerprint":null}\n\n'
    ).encode()


_ROLE = (
    b'data: {"id":"chat-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\n\n'
)
_USAGE = (
    b'data: {"id":"chat-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
)
_DONE = b"data: [DONE]\n\n"


def _streams() -> dict[str, tuple[bytes, int, str | None]]:
    """path -> (SSE body, content chunks, error) of the self-check."""
    words = ["a", " b", ' "text":""', " \\", " é", " c"]
    completion = b"".join(_completion_event(w) for w in words)
    completion += _completion_event("", "length") + _DONE
    chat = _ROLE + b"".join(_chat_event(w) for w in words[:4]) + _chat_event(None, "stop")
    chat += _USAGE + _DONE
    two = (
        b'data: {"choices":[{"index":0,"text":"x"},{"index":1,"text":"y"}]}\n\n'
        b'data: {"choices":[{"index":0,"text":"x"},{"index":1,"text":""}]}\n\n' + _DONE
    )
    crlf = completion.replace(b"\n", b"\r\n")
    multiline = b": ping\n\nevent: message\ndata:" + _completion_event("z")[5:] + _DONE
    err = _completion_event("a") + b'data: {"error":{"message":"boom","code":500}}\n\n' + _DONE
    return {
        "/v1/completions": (completion, len(words), None),
        "/v1/chat/completions": (chat, 4, None),
        "/two/completions": (two, 3, None),
        "/crlf/completions": (crlf, len(words), None),
        "/multi/completions": (multiline, 1, None),
        "/err/completions": (err, 1, "stream_error"),
        "/nodone/completions": (completion[: -len(_DONE)], len(words), "no_done"),
        "/cut/completions": (_completion_event("a") + _completion_event("b")[:50], 1, "disconnect"),
        "/length/completions": (completion, len(words), None),
        "/503/completions": (b'{"error":{"message":"busy"}}', 0, "http_503"),
        "/slow/completions": (b"", 0, "timeout"),
        "/drop/completions": (completion, len(words), None),
    }


async def _self_check() -> None:
    streams = _streams()
    dropped: set[int] = set()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        conn_id = connections
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                length = next(
                    int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")
                )
                json.loads(await reader.readexactly(length))
                body, _, _ = streams[path]
                if path == "/drop/completions" and served and not dropped:
                    dropped.add(conn_id)  # a reused connection the server drops unanswered
                    writer.close()
                    return
                served += 1
                if path == "/slow/completions":
                    await reader.read()  # never answers; returns once the client gives up
                    writer.close()
                    return
                if path == "/503/completions":
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                    await writer.drain()
                    continue
                if path == "/length/completions":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
                for i in range(0, len(body), 7):  # chunks that split events anywhere
                    piece = body[i : i + 7]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    if i % 70 == 0:
                        await writer.drain()
                        await asyncio.sleep(0)
                if path == "/cut/completions":
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = SSEClient(f"http://127.0.0.1:{port}", timeout=0.5)
    window = Window()
    window.lo = 0.0
    for path, (_, tokens, error) in streams.items():
        r = await client.post(path, {"prompt": "x"}, window=window)
        assert (r.tokens, r.error) == (tokens, error), (path, r)
        assert error is not None or (r.done and r.ttft is not None and r.e2e >= r.ttft), r
    # dropped unanswered on the reused connection: sent again on a fresh one
    before = client.connections
    r = await client.post("/drop/completions", {"prompt": "x"})
    assert (r.tokens, r.error) == (streams["/drop/completions"][1], None), r
    assert client.connections == before + 1, client.connections
    assert dropped, "the server did not drop a reused connection"
    assert window.tokens == sum(t for _, t, _ in streams.values()), window.tokens
    client.close()
    refused = SSEClient(f"http://127.0.0.1:{port}", timeout=0.5)
    server.close()
    await server.wait_closed()
    r = await refused.post("/v1/completions", b"{}")
    assert r.error == "connect", r
    print(f"sse_client self-check ok ({connections} server connections)")


if __name__ == "__main__":
    run(_self_check())
