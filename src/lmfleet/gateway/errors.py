"""The one place where the gateway's errors become HTTP responses.

Bodies use the OpenAI error format ``{"error": {"message", "type", "param", "code"}}``
(the shape the ``openai`` client parses), the same as a replica's. The proxy is
plain ASGI, so it sends these with :func:`send_error`; the FastAPI routes get them
through the handlers :func:`install` registers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.gateway.policies.admission import QueueRejected
from lmfleet.http_errors import OpenAIHTTPError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(OpenAIHTTPError, LmfleetError):
    """An answer the gateway gives instead of a replica's: status, OpenAI error
    fields and headers. Recoverable: only this request fails."""

    TYPE_BY_STATUS = _TYPE_BY_STATUS

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


#: error codes of the admission queue's reasons
_QUEUE_CODES = {"queue_full": "queue_full", "timeout": "queue_timeout", "shed": "queue_shed"}


def from_queue(exc: QueueRejected) -> GatewayError:
    """Queue full or shed → 429; waited ``max_wait_s`` without a slot → 503."""
    status = 503 if exc.reason == "timeout" else 429
    return GatewayError(
        status, str(exc), code=_QUEUE_CODES[exc.reason], headers=retry_after(exc.retry_after_s)
    )


def from_exception(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, QueueRejected):
        return from_queue(exc)
    if isinstance(exc, ConfigError):
        return GatewayError(400, str(exc), code="invalid_config")
    return GatewayError(500, f"internal gateway error: {type(exc).__name__}", code="internal_error")


async def send_error(
    send: Send, err: GatewayError, extra_headers: Mapping[str, str] | None = None
) -> None:
    """Send ``err`` as a whole response on a raw ASGI ``send``."""
    body = err.body_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [
        (k.lower().encode(), v.encode())
        for k, v in {**err.headers, **(extra_headers or {})}.items()
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def sse_error_event(err: GatewayError) -> bytes:
    """An ``error`` event inside a stream that already started (the ``openai``
    client raises it as an ``APIError``)."""
    return b"data: " + err.body_bytes() + b"\n\n"


def install(app: FastAPI) -> None:
    """Exception handlers for the FastAPI routes (admin API, models, feedback)."""

    async def gateway_error(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        if err.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return err.response()

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        where = ".".join(str(p) for p in loc) or None
        detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "finite_number":
            detail = "must be a finite number (not NaN or Infinity)"
        msg = f"Invalid value for '{where}': {detail}" if where else f"Invalid body: {detail}"
        return GatewayError(400, msg, param=where, code="invalid_value").response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"{request.method} {request.url.path}: no such endpoint"
        return GatewayError(exc.status_code, message, headers=exc.headers).response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return from_exception(exc).response()

    app.add_exception_handler(LmfleetError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
