"""Streamed answers to HTTP/1.0 clients under uvicorn's httptools protocol.

uvicorn's httptools implementation frames every response that has no
Content-Length as chunked, HTTP/1.0 requests included, and HTTP/1.0 clients cannot
read chunked encoding (RFC 9112 section 6.1: a server must not send
Transfer-Encoding to a client that did not say HTTP/1.1). Its h11 implementation
gets this right; httptools is kept for its speed. :class:`HttpToolsProtocol` (given
to uvicorn as ``http=``) answers such responses close-delimited instead, as RFC 1945
does: the body bytes as they come, and the end of the body is the end of the
connection, which uvicorn closes after every HTTP/1.0 response anyway
(``connection: close``). Streams (server-sent events) so keep streaming.

It relies on two attributes of uvicorn's ``RequestResponseCycle``
(``chunked_encoding``, ``expected_content_length``); a test sends HTTP/1.0 over a
raw socket to catch a uvicorn that changes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol


class HttpToolsProtocol(_HttpToolsProtocol):
    """uvicorn's httptools protocol, answering HTTP/1.0 requests without chunking."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # the cycle of this request (not one left from before an upgrade); its ASGI
        # task is created but has not run yet, so it will call the replaced send
        if cycle is not None and cycle.scope is self.scope and self.scope["http_version"] == "1.0":
            cycle.send = _CloseDelimited(cycle, cycle.send)  # type: ignore[method-assign]


class _CloseDelimited:
    """A cycle's ``send`` for HTTP/1.0: a response without Content-Length is neither
    chunked nor length-checked; its body runs until the connection closes."""

    __slots__ = ("_active", "_cycle", "_send")

    def __init__(self, cycle: Any, send: Callable[[Any], Awaitable[None]]) -> None:
        self._cycle = cycle
        self._send = send
        self._active = False

    async def __call__(self, message: Any) -> None:
        cycle = self._cycle
        kind = message["type"]
        if kind == "http.response.start" and not cycle.response_started:
            headers = message.get("headers", ())
            if not any(name.lower() == b"content-length" for name, _ in headers):
                cycle.chunked_encoding = False  # and no length: uvicorn adds no framing
                self._active = True
        elif kind == "http.response.body" and self._active:
            # uvicorn counts the body against a length; this one is as long as it is
            cycle.expected_content_length = len(message.get("body", b""))
        await self._send(message)
