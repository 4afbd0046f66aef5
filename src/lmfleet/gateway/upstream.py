"""The gateway's HTTP/1.1 client for generation calls to replicas.

Every streamed token crosses this code once, so it is small and direct: an
:class:`asyncio.Protocol` per connection with ``httptools`` (llhttp, C) parsing the
response, keep-alive connections pooled per origin, and the body handed over as the
bytes that arrived, several events at a time when they came together. It replaces
httpx on the hot path, where httpx + httpcore + anyio cost the gateway about
100 µs of CPU per streamed token (``benchmarks/gateway.py``).

What it does not do: redirects, cookies, proxies, compression, HTTP/2. Replicas
speak plain HTTP/1.1 JSON and SSE; that is all the proxy needs.

Errors a caller acts on:

- :class:`ConnectFailed`: the connection could not be opened (refused, unreachable,
  connect timeout): the replica is gone;
- :class:`Disconnected`: the connection broke before the response was complete;
- :class:`UpstreamProtocolError`: the replica's answer is not valid HTTP;
- :class:`TimeoutError`: no data within the time given to a read.

A request that goes out on a pooled connection the replica has just closed (a
keep-alive race) is sent again once on a fresh connection, when nothing of an
answer had arrived.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

#: pause reading a replica once this much body is waiting for a slow client
_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """Base of the errors of an upstream call."""


class ConnectFailed(UpstreamError):
    pass


class Disconnected(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    #: path prefix of the base URL ("" or "/something")
    prefix: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one response at a time."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        #: loop time of the last bytes received, and the idle limit of the current
        #: read: one timer per idle period, not one per chunk
        self.last_data = self._loop.time()
        self._idle_timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.received_any = False
        self.error: UpstreamError | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_data = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid HTTP from the replica: {exc}"))
            self.close()
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            why = f": {exc}" if exc else ""
            self._fail(Disconnected(f"the replica closed the connection{why}"))
        self._wake()

    # ---- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # ---- used by UpstreamResponse -------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until more arrives (or the connection fails); TimeoutError once nothing has
        arrived for ``timeout`` seconds."""
        w = self.waiter = self._loop.create_future()
        if timeout is not None:
            self._idle_timeout = timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self.last_data + timeout, self._check_idle)
        try:
            await w
        finally:
            self.waiter = None

    def _check_idle(self) -> None:
        self._timer = None
        w = self.waiter
        if w is None or w.done():
            return  # not reading now: the next wait arms a timer again
        due = self.last_data + self._idle_timeout
        if self._loop.time() >= due:
            w.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(due, self._check_idle)

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        self.cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamResponse:
    """A response whose head has arrived; read the body with :meth:`read` or
    :meth:`next_chunk`, then :meth:`close` (always: it returns the connection)."""

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in conn.headers}
        #: the whole body, when the caller has read it (see ``Proxy._attempt``)
        self.content: bytes | None = None

    async def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """Body bytes that have arrived (waiting up to ``timeout`` for some), or None
        at the end of the body."""
        conn = self._conn
        if conn is None:
            return None
        while True:
            if conn.body:
                return conn.take()
            if conn.complete:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(timeout)

    async def read(self, timeout: float | None = None) -> bytes:
        """The rest of the body; ``timeout`` bounds the whole read."""
        parts: list[bytes] = []
        async with asyncio.timeout(timeout):
            while (chunk := await self.next_chunk()) is not None:
                parts.append(chunk)
        return b"".join(parts)

    async def finish(self, timeout: float) -> None:
        """Read what is left of the body (after an SSE stream's ``[DONE]`` that is the
        chunked encoding's last chunk) and return the connection to the pool; closed
        instead if more than ``timeout`` passes."""
        try:
            async with asyncio.timeout(timeout):
                while await self.next_chunk() is not None:
                    pass
        except (UpstreamError, TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class UpstreamPool:
    """Keep-alive connections per origin, newest reused first; idle ones are closed
    after ``idle_s`` (before uvicorn's 5 s keep-alive timeout closes them)."""

    def __init__(self, *, idle_s: float = 4.0, max_idle_per_origin: int = 1024) -> None:
        self.idle_s = idle_s
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self.opened = 0  # connections opened over the pool's life (tests, metrics)

    def _origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin.parse(base_url)
        return origin

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        ctx = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin), origin.host, origin.port, ssl=ctx
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        self.opened += 1
        return conn

    def _pooled(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.close()
        return None

    def release(self, conn: _Connection) -> None:
        """Back to the pool when its response was read to the end, else closed."""
        if conn.closed or not conn.complete or not conn.keep_alive or conn.error is not None:
            conn.close()
            return
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.cancel_timer()
        conn._reset()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def request(
        self,
        base_url: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        connect_timeout: float | None,
        head_timeout: float | None,
        method: str = "POST",
    ) -> UpstreamResponse:
        """Send, and return once the response's status and headers are in.

        ``head_timeout`` bounds the wait for the head after sending (TimeoutError).
        """
        origin = self._origin(base_url)
        head = [
            f"{method} {origin.prefix}{path} HTTP/1.1\r\nhost: {origin.host_header}\r\n"
            f"content-length: {len(body)}\r\n"
        ]
        for k, v in headers:
            head.append(f"{k}: {v}\r\n")
        head.append("\r\n")
        raw = "".join(head).encode("latin-1") + body
        for fresh in (False, True):
            conn = None if fresh else self._pooled(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            assert conn.transport is not None
            conn.transport.write(raw)
            try:
                async with asyncio.timeout(head_timeout):
                    while not conn.headers_done:
                        if conn.error is not None:
                            raise conn.error
                        await conn.wait(None)
            except Disconnected:
                conn.close()
                if reused and not conn.received_any:
                    continue  # the replica closed an idle connection as we reused it
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, conn)
        raise AssertionError("unreachable")

    async def fetch(
        self,
        base_url: str,
        path: str,
        body: bytes = b"",
        *,
        method: str = "POST",
        timeout: float,
        connect_timeout: float | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, bytes]:
        """A whole small exchange (status, body) within ``timeout``: polls and the
        resume's tokenize calls."""
        headers = [*([("content-type", "application/json")] if body else []), *(headers or [])]
        async with asyncio.timeout(timeout):
            resp = await self.request(
                base_url, path, body, headers, method=method,
                connect_timeout=connect_timeout, head_timeout=None,
            )  # fmt: skip
            try:
                return resp.status, await resp.read()
            finally:
                resp.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
