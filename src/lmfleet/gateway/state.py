"""The gateway's shared state: configuration, registry, auth, metrics, the pool of
upstream connections, A/B samples, the per-version window stats and the retry
budget. One object, built by the app factory and handed to the proxy and the admin
routes.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from lmfleet.fleet.config import FleetConfig, RetryConfig
from lmfleet.gateway.abstats import VersionSamples
from lmfleet.gateway.auth import Authenticator
from lmfleet.gateway.metrics import GatewayMetrics
from lmfleet.gateway.registry import Registry
from lmfleet.gateway.rollout import StepWindow
from lmfleet.gateway.upstream import UpstreamPool
from lmfleet.gateway.version_stats import VersionStats

logger = logging.getLogger(__name__)

#: response ids remembered for ``POST /v1/feedback``
_FEEDBACK_IDS = 100_000


#: idle pooled connections are closed before servers close them (uvicorn: after 5 s),
#: so a request rarely goes out on a connection the replica is closing
KEEPALIVE_S = 4.0


class FeedbackExists(LookupError):
    """A response id already has its feedback score."""


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
        #: every call to the replicas: generation, polls, the resume's tokenize
        self.upstream = UpstreamPool(idle_s=KEEPALIVE_S)
        self.registry = Registry(config, pool=self.upstream, clock=clock)
        #: arrivals and finishes per version over the recent window (the autoscaler's)
        self.version_stats = VersionStats(clock=clock)
        self.metrics.bind(self.registry, self.version_stats)
        self.auth = Authenticator(config, clock=clock)
        self.retry_budget = RetryBudget(config.gateway.retries, clock)
        self.samples: dict[tuple[str, str], VersionSamples] = {}
        #: the current step's window of each model with a running rollout (the proxy
        #: records split-assigned requests into it; the rollout runner sets it)
        self.windows: dict[str, StepWindow] = {}
        self._response_versions: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: response ids that already have a feedback score (one score per id)
        self._scored: set[str] = set()

    async def start(self) -> None:
        await self.registry.start()

    async def close(self) -> None:
        await self.registry.close()
        await self.upstream.aclose()

    def apply_config(self, config: FleetConfig) -> None:
        """A reload: requests in flight keep what they hold (replica, version, slot)."""
        self.registry.apply_config(config)
        self.version_stats.retain((m.name, v.name) for m in config.models for v in m.versions)
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
            old, _ = self._response_versions.popitem(last=False)
            self._scored.discard(old)

    def record_feedback(self, response_id: str, score: float) -> tuple[str, str] | None:
        """Credit ``score`` to the version that produced ``response_id``; None for an
        unknown id. :class:`FeedbackExists` if the id already has a score: the first
        score stands (a second one would weigh one response twice)."""
        target = self._response_versions.get(response_id)
        if target is None:
            return None
        if response_id in self._scored:
            raise FeedbackExists(response_id)
        self._scored.add(response_id)
        self.version_samples(*target).record_feedback(score)
        return target

    def version_of_response(self, response_id: str) -> tuple[str, str] | None:
        return self._response_versions.get(response_id)
