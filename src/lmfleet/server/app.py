"""The replica's ASGI application: ``build_app(settings) -> FastAPI``.

The lifespan starts the model load as a background task and returns at once, so
the HTTP server answers ``/health/live`` (200) and ``/health/ready`` (503) while the
weights load; the replica turns READY after a warm-up generation. Middleware is pure
ASGI (safe on streaming routes): a body-size limit answering 413 in the OpenAI
error format. Errors of every route are mapped in :mod:`lmfleet.server.errors`.

The app owns a small thread pool for chat-template renders (``app.state.template_pool``,
with the render limits in ``app.state.template_limits``), so that no template, the
model's or a request's, runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmfleet import __version__
from lmfleet.server import errors
from lmfleet.server.admin import admin_router
from lmfleet.server.admin import router as health_router
from lmfleet.server.auth import require_api_key
from lmfleet.server.errors import ApiError
from lmfleet.server.openai_routes import UnknownFields, template_limits
from lmfleet.server.openai_routes import router as openai_router
from lmfleet.server.replica import Replica
from lmfleet.server.settings import ServerSettings

logger = logging.getLogger(__name__)

#: threads rendering chat templates (renders hold the GIL: more would not run faster)
_TEMPLATE_THREADS = min(4, os.cpu_count() or 1)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. An
    ``HTTPException`` so FastAPI's body reader lets it through as it is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodySizeLimit:
    """413 for bodies over ``max_bytes``: at once from ``Content-Length``, or as soon
    as a chunked body passes the limit while the route reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than the limit of {limit} bytes",
        code="request_too_large",
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def build_app(settings: ServerSettings, *, replica: Replica | None = None) -> FastAPI:
    """The ASGI app of one replica. ``replica`` lets a caller (``lmfleet serve``)
    keep a handle for signals; by default one is built from ``settings``."""
    replica = replica or Replica(settings)
    limits = template_limits(settings.chat_template_timeout_s, settings.chat_template_max_chars)
    pool = ThreadPoolExecutor(_TEMPLATE_THREADS, thread_name_prefix="lmfleet-template")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        load = asyncio.get_running_loop().create_task(replica.load(), name="lmfleet-load")
        app.state.load_task = load
        try:
            yield
        finally:
            if not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            await replica.shutdown()
            pool.shutdown(wait=False, cancel_futures=True)  # renders end within their limits

    app = FastAPI(
        title="lmfleet replica",
        version=__version__,
        description=f"OpenAI-compatible API serving {settings.model_name}",
        lifespan=lifespan,
    )
    app.state.replica = replica
    app.state.template_pool = pool
    app.state.template_limits = limits
    app.state.unknown_fields = UnknownFields(replica.metrics)
    errors.install(
        app, retry_after_s=settings.retry_after_s, on_rejected=replica.metrics.record_rejected
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(health_router)
    app.include_router(admin_router)
    app.include_router(openai_router, dependencies=[Depends(require_api_key)])
    return app
