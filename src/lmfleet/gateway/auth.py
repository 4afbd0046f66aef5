"""API keys with per-key rate limits, and the admin token.

Clients send ``Authorization: Bearer KEY``. With no keys configured the OpenAI
routes are open. Each key may carry a requests-per-minute and a tokens-per-minute
limit, each a token bucket refilled continuously (a full minute's worth may burst).
Requests are counted when they arrive; tokens (prompt + completion) when the
answer is known, so a key may overdraw its token bucket by one request and then
waits for it to refill: a request is admitted while the bucket is not negative.
Over a limit the answer is 429 in the OpenAI format with ``Retry-After``.

The admin token guards ``/admin``; it is separate from the API keys. With neither an
admin token nor API keys configured (a local setup), the admin API is open; with
keys but no admin token it is refused, since any client could change the split.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lmfleet.fleet.config import ApiKeyConfig, FleetConfig
from lmfleet.gateway.errors import GatewayError, retry_after


class TokenBucket:
    """``capacity`` tokens refilled at ``capacity`` per minute."""

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.capacity = per_minute
        self.rate_per_s = per_minute / 60.0
        self._clock = clock
        self._tokens = per_minute
        self._stamp = clock()

    def level(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        return self._tokens

    def wait_s(self, need: float) -> float:
        """Seconds until ``need`` tokens are available (0 = now)."""
        missing = need - self.level()
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def take(self, n: float) -> None:
        """Take ``n`` tokens; the level may go negative (an overdraft)."""
        self.level()
        self._tokens -= n


@dataclass(slots=True)
class ClientKey:
    """An authenticated client and its buckets."""

    name: str
    requests: TokenBucket | None
    tokens: TokenBucket | None

    def record_tokens(self, n: int) -> None:
        if self.tokens is not None and n > 0:
            self.tokens.take(n)


#: the identity of requests when no keys are configured
ANONYMOUS = ClientKey("anonymous", None, None)


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


class Authenticator:
    """Checks keys and limits. Buckets survive a reload for keys that stay."""

    def __init__(self, config: FleetConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, ClientKey] = {}
        self._admin: str | None = None
        self.apply_config(config)

    def apply_config(self, config: FleetConfig) -> None:
        keys: dict[str, ClientKey] = {}
        for kc in config.api_keys:
            secret = kc.secret()
            old = self._keys.get(secret)
            keys[secret] = self._client_key(kc, old)
        self._keys = keys
        self._admin = config.gateway.admin_secret()

    def _client_key(self, kc: ApiKeyConfig, old: ClientKey | None) -> ClientKey:
        def bucket(limit: float | None, prev: TokenBucket | None) -> TokenBucket | None:
            if limit is None:
                return None
            if prev is not None and prev.capacity == limit:
                return prev
            return TokenBucket(limit, self._clock)

        return ClientKey(
            kc.name,
            bucket(kc.rpm, old.requests if old else None),
            bucket(kc.tpm, old.tokens if old else None),
        )

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, headers: Mapping[str, str]) -> ClientKey:
        """The caller's key, its limits checked and one request counted; raises
        :class:`GatewayError` 401 or 429."""
        if not self._keys:
            return ANONYMOUS
        token = bearer(headers)
        if token is None:
            raise _unauthorized(
                "Missing API key. Send it as the header 'Authorization: Bearer <API key>'."
            )
        key = None
        for secret, candidate in self._keys.items():  # constant time per key
            if secrets.compare_digest(token.encode(), secret.encode()):
                key = candidate
        if key is None:
            raise _unauthorized("Incorrect API key provided.")
        self._check_limits(key)
        return key

    def _check_limits(self, key: ClientKey) -> None:
        if key.tokens is not None:
            wait = key.tokens.wait_s(0.0)
            if wait > 0:
                raise _rate_limited(key, "tokens per minute", key.tokens.capacity, wait)
        if key.requests is not None:
            wait = key.requests.wait_s(1.0)
            if wait > 0:
                raise _rate_limited(key, "requests per minute", key.requests.capacity, wait)
            key.requests.take(1.0)

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """Raise 401/403 unless the caller holds the admin token (see module doc)."""
        if self._admin is None:
            if self._keys:
                raise GatewayError(
                    403,
                    "the admin API is disabled: API keys are configured but no admin token; "
                    "set gateway.admin_token (or admin_token_env) in the fleet file",
                    code="admin_disabled",
                )
            return
        token = bearer(headers)
        if token is None:
            raise _unauthorized(
                "Missing admin token. Send it as the header 'Authorization: Bearer <admin token>'."
            )
        if not secrets.compare_digest(token.encode(), self._admin.encode()):
            raise _unauthorized("Incorrect admin token provided.")


def _rate_limited(key: ClientKey, what: str, limit: float, wait_s: float) -> GatewayError:
    return GatewayError(
        429,
        f"Rate limit reached for key '{key.name}': {limit:g} {what}. Retry in {wait_s:.1f} s.",
        code="rate_limit_exceeded",
        headers=retry_after(max(1.0, wait_s)),
    )
