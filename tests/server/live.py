"""A replica app served by real uvicorn (lmfleet serve's HTTP implementation) from a
thread, for tests that need real sockets: raw HTTP/1.0, a client that never reads."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from lmfleet.server.app import build_app
from lmfleet.server.replica import Replica
from lmfleet.serving import uvicorn_http
from tests.server_thread import ServerThread

from .conftest import settings_for


@dataclass
class Live:
    url: str
    port: int
    replica: Replica

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def state(self) -> dict:
        return httpx.get(f"{self.url}/state", timeout=30).json()


@contextlib.contextmanager
def live_app(model_dir: Path, *, sndbuf: int | None = None, **overrides: object) -> Iterator[Live]:
    """The app under uvicorn on 127.0.0.1, READY. ``sndbuf`` shrinks the kernel send
    buffer of accepted connections (inherited from the listening socket)."""
    app = build_app(settings_for(model_dir, **overrides))
    server = ServerThread(app, lifespan="on", http=uvicorn_http())  # type: ignore[arg-type]
    if sndbuf is not None:
        server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    with server:
        live = Live(server.url, server.port, app.state.replica)
        poll(lambda: httpx.get(f"{live.url}/health", timeout=5).status_code == 200, 60)
        yield live


def poll(predicate, timeout: float = 30.0, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` holds (an exception counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP response from ``sock``: status line, headers (lower-case names), body
    (Content-Length, or everything until the server closes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the headers: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body
    while chunk := sock.recv(65536):
        body += chunk
    return status, headers, body


def raw_post(path: str, body: bytes, *, version: str = "1.1", keep_alive: bool = True) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n\r\n"
    ).encode() + body
