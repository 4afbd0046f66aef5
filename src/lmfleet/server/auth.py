"""Bearer-token checks: the API key on the OpenAI routes, the admin token on /admin.

Both answer 401 in the OpenAI error format (``code: invalid_api_key``), which the
``openai`` client raises as ``AuthenticationError``. Health, state and metrics stay
open: probes, the gateway and Prometheus read them.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from lmfleet.server.errors import ApiError


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(request: Request, expected: str, what: str) -> None:
    token = _bearer(request)
    if token is None:
        raise ApiError(
            401,
            f"Missing {what}. Send it as the header 'Authorization: Bearer <{what}>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(token.encode(), expected.encode()):
        raise ApiError(
            401,
            f"Incorrect {what} provided.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_key(request: Request) -> None:
    key = request.app.state.replica.settings.api_key
    if key:
        _check(request, key, "API key")


async def require_admin(request: Request) -> None:
    settings = request.app.state.replica.settings
    if settings.admin_token:
        _check(request, settings.admin_token, "admin token")
    elif settings.api_key:
        _check(request, settings.api_key, "API key")
