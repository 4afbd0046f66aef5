"""The gateway's shared state: configuration, registry, auth, metrics, the pooled
upstream client, A/B samples and the retry budget. One object, built by the app
factory and handed to the proxy and the admin routes.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import httpx

from lmfleet.gateway.abstats import VersionSamples
from lmfleet.gateway.auth import Authenticator
from lmfleet.gateway.config import FleetConfig, RetryConfig
from lmfleet.gateway.metrics import GatewayMetrics
from lmfleet.gateway.registry import Registry

logger = logging.getLogger(__name__)

#: response ids remembered for ``POST /v1/feedback``
_FEEDBACK_IDS = 100_000


#: idle pooled connections are closed before servers close them (uvicorn: after 5 s),
#: so a request never goes out on a connection the replica is closing
KEEPALIVE_S = 4.0


def upstream_client(timeout: httpx.Timeout, max_keepalive: int) -> httpx.AsyncClient:
    """A pooled client with TCP_NODELAY on its sockets (replies are small writes)."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=None,
            max_keepalive_connections=max_keepalive,
            keepalive_expiry=KEEPALIVE_S,
        ),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    return httpx.AsyncClient(timeout=timeout, transport=transport)


class RetryBudget:
    """Retries allowed as a share of requests over a sliding window, plus a floor
    per second (Envoy's and Finagle's retry budget): a fleet-wide outage turns into
    errors instead of a retry storm."""

    def __init__(
        self, config: RetryConfig, clock: Callable[[], float] = time.monotonic,
        window_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.config = config
        self._clock = clock
        self._window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and q[0] < now - self._window_s:
                q.popleft()

    def note_request(self) -> None:
        self._requests.append(self._clock())

    def try_retry(self) -> bool:
        now = self._clock()
        self._trim(now)
        allowed = (
            self.config.budget_ratio * len(self._requests)
            + self.config.min_retries_per_s * self._window_s
        )
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


class GatewayState:
    def __init__(
        self,
        config: FleetConfig,
        *,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.started_at = time.time()
        self.rng = rng or random.Random()
        self.metrics = GatewayMetrics()
        self.registry = Registry(config, clock=clock)
        self.metrics.bind(self.registry)
        self.auth = Authenticator(config, clock=clock)
        self.retry_budget = RetryBudget(config.gateway.retries, clock)
        self._client = client
        self.samples: dict[tuple[str, str], VersionSamples] = {}
        self._response_versions: OrderedDict[str, tuple[str, str]] = OrderedDict()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            t = self.config.gateway.timeouts
            self._client = upstream_client(
                httpx.Timeout(t.total_s, connect=t.connect_s, pool=None),
                max_keepalive=4096,
            )
        return self._client

    async def start(self) -> None:
        await self.registry.start()

    async def close(self) -> None:
        await self.registry.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def apply_config(self, config: FleetConfig) -> None:
        """A reload: requests in flight keep what they hold (replica, version, slot)."""
        self.registry.apply_config(config)
        self.auth.apply_config(config)
        self.retry_budget.config = config.gateway.retries
        self.config = config
        logger.info("fleet config applied: %d model(s)", len(config.models))

    # ---- A/B samples ----------------------------------------------------------------------
    def version_samples(self, model: str, version: str) -> VersionSamples:
        key = (model, version)
        s = self.samples.get(key)
        if s is None:
            s = self.samples[key] = VersionSamples()
        return s

    def remember_response(self, response_id: str, model: str, version: str) -> None:
        self._response_versions[response_id] = (model, version)
        while len(self._response_versions) > _FEEDBACK_IDS:
            self._response_versions.popitem(last=False)

    def version_of_response(self, response_id: str) -> tuple[str, str] | None:
        return self._response_versions.get(response_id)
