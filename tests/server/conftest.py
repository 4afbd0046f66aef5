from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from lmfleet.server.app import build_app
from lmfleet.server.replica import Replica
from lmfleet.server.settings import ServerSettings

#: a small KV cache (512 blocks of 16 tokens for the tiny model) keeps tests light
KV_BYTES = 8 * 2**20


def settings_for(model_dir: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": str(model_dir),
        "served_model_names": ("tiny",),
        "progress": False,
        "device": "cpu",
        "kv_cache_memory_bytes": KV_BYTES,
        "max_model_len": 512,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serving(
    model_dir: Path, *, replica: Replica | None = None, wait_ready: bool = True, **overrides: object
) -> AsyncIterator[tuple[httpx.AsyncClient, Replica]]:
    """The app in this process (lifespan run), an httpx client over ASGI, the replica."""
    settings = replica.settings if replica is not None else settings_for(model_dir, **overrides)
    app = build_app(settings, replica=replica)
    rep: Replica = app.state.replica
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            if wait_ready:
                await wait_for(lambda: rep.state.value != "starting", timeout=30)
            yield client, rep


def chat_body(content: str = "Hello", **extra: object) -> dict[str, object]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


class LoopThread:
    """An event loop in a thread, so one in-process app serves a whole test module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@contextlib.contextmanager
def background_app(model_dir: Path, **overrides: object):
    """(loop thread, client, replica) for an app that runs until the block ends."""
    lt = LoopThread()
    cm = serving(model_dir, **overrides)
    try:
        client, replica = lt.run(cm.__aenter__())
        try:
            yield lt, client, replica
        finally:
            lt.run(cm.__aexit__(None, None, None))
    finally:
        lt.close()
