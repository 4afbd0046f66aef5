"""Serve any ASGI app under uvicorn from a background thread (shared by the bench
and gateway tests' in-process fakes)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class ServerThread:
    """Serve ``app`` on a free port of 127.0.0.1 from a background thread.
    ``http`` picks uvicorn's HTTP implementation ("auto", "h11", "httptools")."""

    def __init__(self, app: object, *, lifespan: str = "off", http: str = "auto") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            log_level="critical",
            lifespan=lifespan,  # type: ignore[arg-type]
            ws="none",
            http=http,  # type: ignore[arg-type]
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
