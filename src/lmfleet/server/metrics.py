"""Prometheus metrics of one replica: what ``GET /metrics`` serves.

Boundary: this module only turns numbers into Prometheus series. It knows nothing
about HTTP routing or the engine's internals: the server pushes per-request events
(``record_*``, ``observe_token_gap``) and lends a callable that returns an
``EngineStats`` snapshot, which is read at scrape time. The engine's cumulative
totals (tokens, preemptions, prefix-cache tokens, steps) are exposed as real
counters by a custom collector, so ``rate()`` works on them and they include
aborted requests. Every series carries the labels ``model`` and ``version``.

Each ``ReplicaMetrics`` owns its own ``CollectorRegistry`` unless one is given, so
tests and multi-model processes can build as many as they like.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from lmfleet.engine.request import FinishReason, RequestOutput
from lmfleet.engine.stats import EngineStats
from lmfleet.serving import E2E_BUCKETS, TOKEN_GAP_BUCKETS, TTFT_BUCKETS

__all__ = [
    "E2E_BUCKETS",
    "QUEUE_BUCKETS",
    "REPLICA_STATES",
    "TOKEN_GAP_BUCKETS",
    "TOKEN_LENGTH_BUCKETS",
    "TTFT_BUCKETS",
    "ReplicaMetrics",
]

PREFIX = "lmfleet"
LABELS = ("model", "version")
REPLICA_STATES = ("starting", "ready", "draining", "asleep", "stopped")

# Waiting before the first schedule: zero on an idle replica, minutes when saturated.
QUEUE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Prompt and generation lengths in tokens: powers of two up to 128 Ki.
TOKEN_LENGTH_BUCKETS = tuple(float(2**i) for i in range(18))


@dataclass(frozen=True, slots=True)
class MemoryReading:
    device: str
    used_bytes: int
    total_bytes: int


# ---- memory probes ---------------------------------------------------------------------
def _cuda_initialized() -> bool:
    """True when this process already uses CUDA; never imports torch itself."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except RuntimeError:
        return False


def _read_cuda_memory(device: str) -> MemoryReading | None:
    import torch

    try:
        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        _free, total = torch.cuda.mem_get_info(index)
        used = torch.cuda.memory_allocated(index)
    except (RuntimeError, AssertionError):
        return None
    return MemoryReading(f"cuda:{index}", int(used), int(total))


def _process_rss_bytes() -> int:
    """Resident set size of this process (second field of /proc/self/statm, in pages)."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * page
    except (OSError, IndexError, ValueError):
        import resource  # peak, not current: only a fallback off Linux

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _system_memory_bytes() -> int:
    """Total physical memory (MemTotal of /proc/meminfo, in kB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_memory(device: str | None) -> MemoryReading:
    """Accelerator memory for CUDA devices; process RSS and system memory on CPU."""
    if device is None:
        device = "cuda" if _cuda_initialized() else "cpu"
    if device.startswith("cuda"):
        reading = _read_cuda_memory(device)
        if reading is not None:
            return reading
    return MemoryReading("cpu", _process_rss_bytes(), _system_memory_bytes())


# (type, metric name, EngineStats field, help) of the series read at scrape time.
_ENGINE_SERIES = (
    ("gauge", "num_requests_running", "num_running", "Requests in the running batch."),
    ("gauge", "num_requests_waiting", "num_waiting", "Requests queued in the engine, not running."),
    ("gauge", "kv_cache_usage_ratio", "kv_usage", "Fraction of KV-cache blocks in use (0-1)."),
    ("gauge", "kv_blocks_total", "num_blocks", "KV-cache blocks allocated for the engine."),
    ("gauge", "kv_blocks_free", "num_free_blocks", "Free KV-cache blocks (cached prefixes count)."),
    ("counter", "prompt_tokens", "prompt_tokens_total", "Prompt tokens admitted, aborts too."),
    ("counter", "generation_tokens", "generation_tokens_total", "Tokens generated, aborts too."),
    ("counter", "num_preemptions", "num_preemptions", "Requests preempted for lack of KV blocks."),
    ("counter", "prefix_cache_queries", "prefix_queries", "Tokens looked up in the prefix cache."),
    ("counter", "prefix_cache_hits", "prefix_hits", "Tokens found in the prefix cache."),
    ("counter", "engine_steps", "steps", "Engine steps that ran a batch."),
)


# ---- scrape-time collector ---------------------------------------------------------------
class _ScrapeCollector:
    """Yields the series computed when Prometheus scrapes: engine stats and memory."""

    def __init__(self, labels: tuple[str, str], device: str | None) -> None:
        self._labels = labels
        self._device = device
        self._source: Callable[[], EngineStats | None] | None = None

    def set_source(self, fn: Callable[[], EngineStats | None]) -> None:
        self._source = fn

    def describe(self) -> Iterable[Metric]:
        return [*self._engine_families(None), *self._memory_families(None)]

    def collect(self) -> Iterator[Metric]:
        stats = self._source() if self._source is not None else None
        yield from self._engine_families(stats)
        yield from self._memory_families(_read_memory(self._device))

    def _engine_families(self, s: EngineStats | None) -> list[Metric]:
        """Without a snapshot (engine not loaded yet) the families have no samples."""
        families: list[Metric] = []
        for kind, name, field, doc in _ENGINE_SERIES:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(f"{PREFIX}_{name}", doc, labels=LABELS)
            if s is not None:
                family.add_metric(self._labels, float(getattr(s, field)))
            families.append(family)
        return families

    def _memory_families(self, m: MemoryReading | None) -> list[Metric]:
        labels = (*LABELS, "device")
        used = GaugeMetricFamily(
            f"{PREFIX}_accelerator_memory_used_bytes",
            "Memory in use: CUDA allocator bytes, or process RSS on CPU.",
            labels=labels,
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_accelerator_memory_total_bytes",
            "Memory of the device: CUDA total, or system memory on CPU.",
            labels=labels,
        )
        if m is not None:
            used.add_metric((*self._labels, m.device), m.used_bytes)
            total.add_metric((*self._labels, m.device), m.total_bytes)
        return [used, total]


# ---- the public object ------------------------------------------------------------------
def _duration(start: float | None, end: float | None) -> float | None:
    """``end - start``, or None when either is missing or time ran backwards."""
    if start is None or end is None or end < start:
        return None
    return end - start


class ReplicaMetrics:
    """All metrics of one replica serving one model version.

    ``device`` picks the memory probe: ``"cuda"``/``"cuda:N"`` or ``"cpu"``; None
    (the default) uses CUDA when this process has initialised it, else the CPU probe.
    """

    def __init__(
        self,
        model: str,
        version: str,
        registry: CollectorRegistry | None = None,
        *,
        device: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = (model, version)
        self._scrape = _ScrapeCollector(self._labels, device)
        self.registry.register(self._scrape)
        self._build_state_and_lifecycle()
        self._build_request_metrics()
        self.set_state("starting")

    # ---- construction --------------------------------------------------------------
    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, (*LABELS, *extra), registry=self.registry)

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", doc, (*LABELS, *extra), registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", doc, LABELS, registry=self.registry, buckets=buckets
        ).labels(*self._labels)

    def _build_state_and_lifecycle(self) -> None:
        self._state = self._gauge(
            "replica_state", "1 for the replica's current state, 0 for the others.", ("state",)
        )
        for state in REPLICA_STATES:
            self._state.labels(*self._labels, state).set(0)
        g = self._gauge
        self._load_seconds = g("model_load_seconds", "Seconds the last model load took.")
        self._load_bytes = g("model_load_bytes", "Bytes of weights the last load read.")
        self._load_rate = g("model_load_bytes_per_second", "Throughput of the last model load.")
        self._sleep_seconds = g("sleep_seconds", "Seconds the last sleep (offload) took.")
        self._wake_seconds = g("wake_seconds", "Seconds the last wake (reload to device) took.")
        self._sleeps = self._counter("sleeps", "Times the replica went to sleep.")
        self._wakes = self._counter("wakes", "Times the replica woke up.")
        for metric in (self._load_seconds, self._load_bytes, self._load_rate):
            metric.labels(*self._labels).set(0)
        for metric in (self._sleep_seconds, self._wake_seconds, self._sleeps, self._wakes):
            metric.labels(*self._labels)  # present (at 0) before the first event

    def _build_request_metrics(self) -> None:
        self._success = self._counter(
            "request_success",
            "Finished requests, by why they finished (stop, length, abort).",
            ("finished_reason",),
        )
        for reason in FinishReason:
            self._success.labels(*self._labels, str(reason))
        self._rejected = self._counter(
            "request_rejected", "Requests refused before reaching the engine.", ("reason",)
        )
        self._unknown_fields = self._counter(
            "request_unknown_fields",
            "Request fields lmfleet does not know, ignored (or refused when strict).",
            ("field",),
        )
        h = self._histogram
        self._ttft = h("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self._tpot = h(
            "time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).",
            TOKEN_GAP_BUCKETS,
        )
        self._itl = h(
            "inter_token_latency_seconds", "Gap between streamed tokens.", TOKEN_GAP_BUCKETS
        )
        self._e2e = h("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self._queue = h("request_queue_time_seconds", "Arrival to first schedule.", QUEUE_BUCKETS)
        self._prompt_len = h(
            "request_prompt_tokens", "Prompt length of finished requests.", TOKEN_LENGTH_BUCKETS
        )
        self._gen_len = h(
            "request_generation_tokens", "Output length of finished requests.", TOKEN_LENGTH_BUCKETS
        )

    # ---- state and lifecycle ------------------------------------------------------
    def set_state(self, state: str) -> None:
        if state not in REPLICA_STATES:
            raise ValueError(f"unknown replica state {state!r}; expected one of {REPLICA_STATES}")
        for s in REPLICA_STATES:
            self._state.labels(*self._labels, s).set(1 if s == state else 0)

    def set_engine_stats_source(self, fn: Callable[[], EngineStats | None]) -> None:
        """``fn`` is called on every scrape; returning None hides the engine series."""
        self._scrape.set_source(fn)

    def record_load(self, seconds: float, num_bytes: int) -> None:
        self._load_seconds.labels(*self._labels).set(seconds)
        self._load_bytes.labels(*self._labels).set(num_bytes)
        self._load_rate.labels(*self._labels).set(num_bytes / seconds if seconds > 0 else 0.0)

    def record_sleep(self, seconds: float) -> None:
        self._sleep_seconds.labels(*self._labels).set(seconds)
        self._sleeps.labels(*self._labels).inc()

    def record_wake(self, seconds: float) -> None:
        self._wake_seconds.labels(*self._labels).set(seconds)
        self._wakes.labels(*self._labels).inc()

    # ---- requests -------------------------------------------------------------------
    def record_rejected(self, reason: str) -> None:
        self._rejected.labels(*self._labels, reason).inc()

    def record_unknown_field(self, field: str) -> None:
        """One request carried ``field`` (the caller bounds how many names there are)."""
        self._unknown_fields.labels(*self._labels, field).inc()

    def record_finished(
        self, output: RequestOutput, num_prompt_tokens: int, num_generation_tokens: int
    ) -> None:
        """Count one finished request and observe its latencies from ``output.metrics``.

        A latency whose timestamps are missing is skipped, so an aborted request that
        never produced a token adds to e2e and queue time but not to TTFT.
        """
        reason = str(output.finish_reason) if output.finish_reason is not None else "unknown"
        self._success.labels(*self._labels, reason).inc()
        self._prompt_len.observe(num_prompt_tokens)
        self._gen_len.observe(num_generation_tokens)
        m = output.metrics
        if m is None:
            return
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        self._observe(self._queue, _duration(m.arrival_time, m.first_scheduled_time))
        self._observe(self._ttft, _duration(m.arrival_time, m.first_token_time))
        self._observe(self._e2e, _duration(m.arrival_time, end))
        decode = _duration(m.first_token_time, m.last_token_time)
        if decode is not None and num_generation_tokens > 1:
            self._tpot.observe(decode / (num_generation_tokens - 1))

    def observe_token_gap(self, seconds: float) -> None:
        if seconds >= 0:
            self._itl.observe(seconds)

    def observe_token_gaps(self, gaps: Sequence[float]) -> None:
        """Observe a request's gaps at once (the server calls this when it ends):
        the same series as one ``observe_token_gap`` per gap, with one locked
        increment per bucket touched instead of two per gap."""
        kept = [g for g in gaps if g >= 0]
        if not kept:
            return
        h = self._itl
        bounds = getattr(h, "_upper_bounds", None)
        buckets = getattr(h, "_buckets", None)
        total = getattr(h, "_sum", None)
        if bounds is None or buckets is None or total is None:  # another client version
            for g in kept:
                h.observe(g)
            return
        # Histogram.observe counts `amount` in the first bucket with amount <= bound
        for index, count in Tally(bisect.bisect_left(bounds, g) for g in kept).items():
            buckets[index].inc(count)
        total.inc(math.fsum(kept))

    @staticmethod
    def _observe(histogram: Histogram, value: float | None) -> None:
        if value is not None:
            histogram.observe(value)

    # ---- exposition ---------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics`` (text format 0.0.4).

        The ``*_created`` timestamps the client library adds to every counter and
        histogram are left out: they double the series and no dashboard uses them.
        """
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_PLAIN_0_0_4


class _WithoutCreated(Collector):
    """A view of a registry whose families lack their ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield kept
