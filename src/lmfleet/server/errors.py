"""The one place where errors become HTTP responses in the OpenAI error format.

Every error body is ``{"error": {"message", "type", "param", "code"}}``, the shape
the official ``openai`` client parses. lmfleet's own exceptions, request validation
errors (400, naming the field by its dotted path), Starlette's HTTP errors and
anything unexpected (500) are all mapped here; routes raise, they never build error
responses themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmfleet.errors import (
    ConfigError,
    EngineBusy,
    EngineDead,
    LmfleetError,
    QueueFull,
    RequestFailed,
    RequestRejected,
)
from lmfleet.http_errors import INVALID_REQUEST, OpenAIHTTPError
from lmfleet.server.protocol import LONE_SURROGATE

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: INVALID_REQUEST,
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}
# pydantic error type -> OpenAI-style code
_CODE_BY_PYDANTIC = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}


class ApiError(OpenAIHTTPError):
    """An error with its HTTP status and OpenAI error fields; raised by routes."""

    TYPE_BY_STATUS = _TYPE_BY_STATUS


# ---- lmfleet errors -------------------------------------------------------------------
def from_lmfleet(exc: LmfleetError, *, retry_after_s: int = 1) -> ApiError:
    """Map one of lmfleet's exceptions to a status and an error body."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(
            429, str(exc), param=exc.param, code=exc.code,
            headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip
    if isinstance(exc, RequestRejected):
        return ApiError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineBusy):
        return ApiError(409, str(exc), code="engine_busy", type="conflict_error")
    if isinstance(exc, RequestFailed):  # this request alone; the engine goes on
        return ApiError(500, str(exc), code=exc.code)
    if isinstance(exc, EngineDead):
        return ApiError(
            503, str(exc), code="engine_dead", headers={"Retry-After": str(retry_after_s)}
        )
    if isinstance(exc, ConfigError):
        return ApiError(500, str(exc), code="config_error")
    return ApiError(500, str(exc), code="internal_error")


def answer_for(exc: Exception, *, retry_after_s: int = 1) -> ApiError:
    """The error answer the handlers below give for ``exc``; for a failure after the
    response began (early headers, ``server/early_headers.py``)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LmfleetError):
        return from_lmfleet(exc, retry_after_s=retry_after_s)
    return _internal(exc)


def _internal(exc: Exception) -> ApiError:
    return ApiError(500, f"internal server error: {type(exc).__name__}")


def rename_param(exc: RequestRejected, aliases: Mapping[str, str]) -> RequestRejected:
    """Point ``exc.param`` at the field the client actually sent (e.g. the engine says
    ``max_tokens``, the chat request used ``max_completion_tokens``)."""
    if exc.param is not None and exc.param in aliases:
        exc.param = aliases[exc.param]
    return exc


# ---- validation errors -----------------------------------------------------------------
def field_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "messages", 0, "role")`` → ``"messages[0].role"``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _is_union_tag(part: str | int) -> bool:
    # pydantic names the member of a union that failed: 'str', 'list[int]', 'function-after[...]'
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def from_validation(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """The first invalid field of a request (all union alternatives of it together)."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return ApiError(
            400,
            f"The request body is not valid JSON: {detail}",
            code="invalid_json",
        )
    if first.get("type") == LONE_SURROGATE:  # raised for the whole body, names the string
        prefix = field_path(first["loc"])
        inner = str((first.get("ctx") or {}).get("field") or "")
        name = f"{prefix}.{inner}" if prefix and inner else (prefix or inner or None)
        return ApiError(
            400, str(first.get("msg", "invalid text")), param=name, code="invalid_value"
        )
    if first.get("type") == "extra_forbidden":
        name = field_path(first["loc"])
        return ApiError(
            400, f"Unrecognized request argument supplied: {name}", param=name, code=None
        )
    if first.get("type") == "model_attributes_type" and len(first["loc"]) <= 1:
        return ApiError(
            400,
            "The request body must be a JSON object, sent with 'Content-Type: application/json'",
            code="invalid_json",
        )
    top = first["loc"][:2]
    group = [e for e in errors if tuple(e["loc"][:2]) == tuple(top)]
    loc = _common_prefix([tuple(p for p in e["loc"] if not _is_union_tag(p)) for e in group])
    name = field_path(loc)
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid")) for e in group))
    msg = "; ".join(msgs[:3]) + ("; ..." if len(msgs) > 3 else "")
    code = _CODE_BY_PYDANTIC.get(first.get("type", ""), "invalid_value")
    if name is None:
        return ApiError(400, f"Invalid request body: {msg}", code=code)
    return ApiError(400, f"Invalid value for '{name}': {msg}", param=name, code=code)


def _common_prefix(locs: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


# ---- installation ----------------------------------------------------------------------
def install(app: FastAPI, *, retry_after_s: int = 1, on_rejected: Any = None) -> None:
    """Register the exception handlers on ``app``. ``on_rejected(reason)`` is told
    about every 4xx caused by the client's input on the generation routes (metrics)."""

    def note_invalid(request: Request) -> None:
        if on_rejected is not None and request.url.path.startswith("/v1/"):
            on_rejected("invalid")

    # each handler is registered for its own exception class only
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if 400 <= exc.status < 500 and exc.status != 429:
            note_invalid(request)
        return exc.response()

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        note_invalid(request)
        return from_validation(exc.errors()).response()

    async def lmfleet_error(request: Request, exc: LmfleetError) -> JSONResponse:
        err = from_lmfleet(exc, retry_after_s=retry_after_s)
        if err.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        elif err.status != 429:
            note_invalid(request)
        return err.response()

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        return ApiError(exc.status_code, message, code=code, headers=exc.headers).response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _internal(exc).response()

    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(LmfleetError, lmfleet_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
