"""Early headers for non-streaming answers: the replica's side of the contract in
docs/gateway.md, "Non-streaming answers and first_byte_s".

A non-streaming request that carries ``x-lmfleet-early-headers: 1`` and has been
admitted gets ``200`` with ``content-type: application/json`` and the same header
at once, then a chunked body: one space (JSON whitespace) at least every
``keepalive_s`` while it generates, and at the end the response JSON, or, if it
failed, ``{"error": {...}, "status": N}`` with the error and status it would have
had. Refusals decided before that (validation, admission, drain, a dead engine)
are plain error answers, as without the header. This module knows nothing about
the OpenAI formats: it gets the work as a task and a function that maps a failure
to its error answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from lmfleet.http_errors import OpenAIHTTPError

logger = logging.getLogger(__name__)

#: the request header that asks for early headers, echoed in the answer's headers
EARLY_HEADERS = "x-lmfleet-early-headers"
#: while an early answer generates, a space goes out at least this often (the
#: gateway leaves a replica silent for its idle_s, 30 s by default)
KEEPALIVE_S = 5.0

_SPACE = {"type": "http.response.body", "body": b" ", "more_body": True}


def requested(request: Request) -> bool:
    """Whether the request asks for early headers."""
    return request.headers.get(EARLY_HEADERS) == "1"


async def started(work: Coroutine[Any, Any, dict[str, Any]]) -> asyncio.Task[dict[str, Any]]:
    """``work`` as a task, after one turn of the loop: checks the engine makes
    synchronously when a request is added (a prompt past the context, a duplicate
    id, a dead engine) have then run, and their error is raised here, to be answered
    as without early headers. The task is cancelled if this is."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.sleep(0)  # the task's first step runs before this resumes
    except BaseException:
        task.cancel()
        raise
    if task.done() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return task


class EarlyJSONResponse(Response):
    """200 and its headers at once; spaces while ``work`` runs; then its result as
    JSON, or the error answer ``fail`` maps its exception to, with the status in the
    body. A client that disconnects cancels ``work``. ``on_close`` runs
    synchronously however the answer ends (complete, client gone, server stopping)."""

    media_type = "application/json"

    def __init__(
        self,
        work: asyncio.Task[dict[str, Any]],
        fail: Callable[[Exception], OpenAIHTTPError],
        on_close: Callable[[], None],
        rid: str,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"X-Request-Id": rid, EARLY_HEADERS: "1"})
        self._work = work
        self._fail = fail
        self._on_close = on_close
        self._keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            await send(start)
            while True:
                done, _ = await asyncio.wait(
                    {self._work, gone}, timeout=self._keepalive_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if self._work in done:
                    break
                if gone in done:
                    logger.info("client disconnected; request aborted")
                    return
                await send(_SPACE)
            end = {"type": "http.response.body", "body": self._result(), "more_body": False}
            await send(end)
        finally:
            gone.cancel()
            if self._work.done():
                if not self._work.cancelled():
                    self._work.exception()  # retrieved, even when the client left first
            else:
                self._work.cancel()
            self._on_close()

    def _result(self) -> bytes:
        exc = self._work.exception()
        if exc is None:
            return JSONResponse(self._work.result()).body
        if not isinstance(exc, Exception):
            raise exc
        err = self._fail(exc)
        return json.dumps({**err.body(), "status": err.status}, separators=(",", ":")).encode()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
