"""The OpenAI error format, shared by every HTTP front of lmfleet.

Bodies are ``{"error": {"message", "type", "param", "code"}}``, the shape the
official ``openai`` client parses. The replica server and the gateway each map
their own exceptions onto :class:`OpenAIHTTPError` (in ``server/errors.py`` and
``gateway/errors.py``); this module holds what the two have in common and imports
nothing from the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from starlette.responses import JSONResponse

INVALID_REQUEST = "invalid_request_error"


def error_body(
    message: str, *, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIHTTPError(Exception):
    """An answer to give instead of a result: HTTP status, OpenAI error fields and
    headers. ``type`` defaults from the subclass's ``TYPE_BY_STATUS``."""

    TYPE_BY_STATUS: ClassVar[Mapping[int, str]] = {}

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPE_BY_STATUS.get(status, INVALID_REQUEST)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
