"""Prometheus metrics of the gateway: what its ``GET /metrics`` serves.

Per model and version: requests by outcome, TTFT, TPOT and end-to-end latency as
the gateway's client sees them, prompt and completion tokens, queue depth (the
autoscaler's signal: ``lmfleet_gateway_queue_depth{model,version}``) and queue
wait, retries, stream resumes, shadow copies, replicas routable, connections opened
to replicas. Gauges of state
(queue depth, in-flight, replicas, weights) are read from the registry at scrape
time, so the request path only touches counters and histograms. So are the
recent-window gauges of :mod:`lmfleet.gateway.version_stats` (``lmfleet_gateway_version_*``:
arrival rate, output tokens/s, TTFT and TPOT p50/p90, replicas by state, measured
time-to-ready and wake); a figure with no sample has no series.

Each ``GatewayMetrics`` owns its ``CollectorRegistry``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from lmfleet.gateway.version_stats import replicas_by_state
from lmfleet.serving import E2E_BUCKETS, TOKEN_GAP_BUCKETS, TTFT_BUCKETS

if TYPE_CHECKING:
    from lmfleet.gateway.registry import Registry
    from lmfleet.gateway.version_stats import VersionStats

PREFIX = "lmfleet_gateway"
LABELS = ("model", "version")
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

QUEUE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class _StateCollector(Collector):
    """Gauges read from the registry and the version stats when Prometheus scrapes."""

    def __init__(
        self,
        registry: Callable[[], Registry | None],
        stats: Callable[[], VersionStats | None] = lambda: None,
    ) -> None:
        self._registry = registry
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        reg = self._registry()
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "requests waiting for a slot", labels=LABELS
        )
        inflight = GaugeMetricFamily(
            f"{PREFIX}_inflight_requests", "requests admitted and not finished", labels=LABELS
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_capacity", "slots: routable replicas × max_inflight", labels=LABELS
        )
        weight = GaugeMetricFamily(f"{PREFIX}_version_weight", "traffic weight", labels=LABELS)
        replicas = GaugeMetricFamily(
            f"{PREFIX}_replicas", "replicas by routability", labels=(*LABELS, "routable")
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_wait_seconds", "wait of the oldest queued request",
            labels=LABELS,
        )  # fmt: skip
        if reg is not None:
            for v in reg.all_versions():
                labels = [v.model, v.name]
                depth.add_metric(labels, v.queue.depth)
                inflight.add_metric(labels, v.queue.inflight)
                capacity.add_metric(labels, v.queue.capacity)
                weight.add_metric(labels, v.weight)
                oldest.add_metric(labels, v.queue.oldest_wait_s())
                n_up = sum(1 for r in v.replicas.values() if r.routable)
                replicas.add_metric([*labels, "true"], n_up)
                replicas.add_metric([*labels, "false"], len(v.replicas) - n_up)
        yield from (depth, inflight, capacity, weight, replicas, oldest)
        if reg is not None:
            yield from _window_gauges(reg, self._stats())
        if reg is not None and reg.pool is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_upstream_connections_opened",
                "connections opened to replicas (keep-alive reuse keeps this low)",
                value=reg.pool.opened,
            )


def _window_gauges(reg: Registry, stats: VersionStats | None) -> Iterator[Metric]:
    """Per version: replicas by state, and the recent window's figures."""

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_version_{name}", doc, labels=(*LABELS, *extra))

    by_state = gauge("replicas", "replicas by state (ReplicaInfo.state)", ("state",))
    arrival = gauge("arrival_rate", "requests per second assigned to the version, "
                    "over the recent window")  # fmt: skip
    tokens = gauge("output_tokens_per_second", "output tokens per second of requests "
                   "finished in the recent window")  # fmt: skip
    ttft = gauge("ttft_seconds", "time to first token over the recent window",
                 ("quantile",))  # fmt: skip
    tpot = gauge("tpot_seconds", "time per output token over the recent window",
                 ("quantile",))  # fmt: skip
    span = gauge("window_seconds", "the span the window's rates cover")
    ready = gauge("time_to_ready_seconds", "last measured replica start → READY")
    wake = gauge("wake_seconds", "last measured replica wake → READY")
    for v in reg.all_versions():
        labels = [v.model, v.name]
        for state, n in replicas_by_state(v.replicas.values()).items():
            by_state.add_metric([*labels, state], n)
        if stats is None:
            continue
        w = stats.window(v.model, v.name)
        for family, value in ((arrival, w.arrival_rate), (tokens, w.output_tokens_per_s),
                              (ready, w.time_to_ready_s), (wake, w.wake_s)):  # fmt: skip
            if value is not None:
                family.add_metric(labels, value)
        if w.window_s > 0:
            span.add_metric(labels, w.window_s)
        for family, q, value in ((ttft, "0.5", w.ttft_p50_s), (ttft, "0.9", w.ttft_p90_s),
                                 (tpot, "0.5", w.tpot_p50_s), (tpot, "0.9", w.tpot_p90_s)):  # fmt: skip
            if value is not None:
                family.add_metric([*labels, q], value)
    yield from (by_state, arrival, tokens, ttft, tpot, span, ready, wake)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._fleet: Registry | None = None
        self._stats: VersionStats | None = None
        self.requests = Counter(
            f"{PREFIX}_requests", "generation requests by outcome",
            (*LABELS, "outcome"), registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "arrival at the gateway → first token sent",
            LABELS, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "(e2e − TTFT) / (output tokens − 1)",
            LABELS, buckets=TOKEN_GAP_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "arrival → last byte sent",
            LABELS, buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "time in the admission queue",
            LABELS, buckets=QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            f"{PREFIX}_tokens", "tokens by kind (prompt, completion)",
            (*LABELS, "kind"), registry=r,
        )  # fmt: skip
        self.errors = Counter(
            f"{PREFIX}_errors", "failed requests by kind", (*LABELS, "kind"), registry=r
        )
        self.retries = Counter(
            f"{PREFIX}_retries", "attempts sent to another replica, by reason",
            (*LABELS, "reason"), registry=r,
        )  # fmt: skip
        self.resumes = Counter(
            f"{PREFIX}_stream_resumes", "streams continued on another replica, by outcome",
            (*LABELS, "outcome"), registry=r,
        )  # fmt: skip
        self.shadow = Counter(
            f"{PREFIX}_shadow_requests", "copies sent to a shadow version, by outcome",
            (*LABELS, "outcome"), registry=r,
        )  # fmt: skip
        self.shadow_skipped = Counter(
            f"{PREFIX}_shadow_skipped", "shadow copies not sent, by reason (no_capacity: no "
            "free slot on the shadow version; max_inflight: shadow.max_inflight reached)",
            (*LABELS, "reason"), registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            f"{PREFIX}_rejected", "requests refused before routing, by reason",
            ("reason",), registry=r,
        )  # fmt: skip
        self.registry.register(_StateCollector(lambda: self._fleet, lambda: self._stats))

    def bind(self, fleet: Registry, stats: VersionStats | None = None) -> None:
        self._fleet = fleet
        self._stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
