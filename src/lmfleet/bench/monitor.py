"""Poll the target's queue depth, running requests, replica count and KV cache usage
about once a second while a benchmark runs.

Two sources, probed once at the start and used if they answer:
- ``GET /state``: JSON with ``waiting``, ``running`` and maybe ``replicas`` (a
  number or a list) and ``kv_cache_usage``, as lmfleet's replica serves it; or
  nested, as lmfleet's gateway serves it (model -> version -> ``queue_depth``,
  ``inflight``, ``replicas``), summed over the versions;
- ``GET /metrics``: Prometheus text; each quantity is the sum over the samples of
  the first metric present from its list (lmfleet's replica and gateway, vLLM,
  SGLang and TGI names; a name may carry a label selector; more can be given on
  the command line).

A target that offers neither is skipped silently: the run goes on without those
plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)

QUANTITIES = ("waiting", "running", "replicas", "kv_cache_usage")

DEFAULT_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "waiting": (
        "lmfleet_gateway_queue_depth",
        "lmfleet_num_requests_waiting",
        "vllm:num_requests_waiting",
        "sglang:num_queue_reqs",
        "tgi_queue_size",
    ),
    "running": (
        "lmfleet_gateway_inflight_requests",
        "lmfleet_num_requests_running",
        "vllm:num_requests_running",
        "sglang:num_running_reqs",
        "tgi_batch_current_size",
    ),
    "replicas": (
        'lmfleet_gateway_replicas{routable="true"}',
        "lmfleet_replicas",
        "lmfleet_autoscaler_replicas",
    ),
    "kv_cache_usage": (
        "lmfleet_kv_cache_usage",
        "lmfleet_kv_cache_usage_ratio",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ),
}

_STATE_KEYS: dict[str, tuple[str, ...]] = {
    "waiting": ("waiting", "num_waiting", "queue_depth", "num_requests_waiting"),
    "running": ("running", "num_running", "num_requests_running", "inflight"),
    "replicas": ("replicas", "num_replicas", "ready_replicas"),
    "kv_cache_usage": ("kv_cache_usage",),
}
#: how deep to look for those keys in a nested state document
_STATE_DEPTH = 4


@dataclass(frozen=True, slots=True)
class MonitorSample:
    #: seconds from the start of the run
    t: float
    waiting: float | None = None
    running: float | None = None
    replicas: float | None = None
    kv_cache_usage: float | None = None


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    base_url: str
    interval_s: float = 1.0
    metric_names: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_METRIC_NAMES)
    )
    headers: Mapping[str, str] = field(default_factory=dict)


def with_extra_metric_names(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["waiting=my_queue_depth"]`` puts ``my_queue_depth`` first for ``waiting``."""
    from lmfleet.errors import ConfigError

    names = dict(DEFAULT_METRIC_NAMES)
    for item in items:
        key, sep, name = item.partition("=")
        if not sep or key not in QUANTITIES or not name:
            raise ConfigError(
                f"monitor-metric: expected QUANTITY=METRIC_NAME with QUANTITY one of "
                f"{', '.join(QUANTITIES)}; got {item!r}"
            )
        names[key] = (name, *names[key])
    return names


# ---- parsing (pure) ---------------------------------------------------------------------
def _selector(spec: str) -> tuple[str, tuple[str, ...]]:
    """``'name{a="1",b="2"}'`` -> ``('name', ('a="1"', 'b="2"'))``."""
    name, brace, rest = spec.partition("{")
    if not brace:
        return spec, ()
    return name, tuple(p.strip() for p in rest.rstrip("}").split(",") if p.strip())


def parse_prometheus(text: str, wanted: set[str] | None = None) -> dict[str, float]:
    """Metric -> the sum of its samples' values, from Prometheus text. A wanted
    metric may carry a label selector, ``name{label="value"}``: only the samples
    with those labels are summed under that key."""
    selectors: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for spec in wanted or ():
        name, pairs = _selector(spec)
        selectors.setdefault(name, []).append((spec, pairs))
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            close = line.rfind("}")
            labels, rest = line[brace:close], line[close + 1 :]
        else:
            name, _, rest = line.partition(" ")
            labels = ""
        if wanted is not None and name not in selectors:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if wanted is None:
            sums[name] = sums.get(name, 0.0) + value
            continue
        for spec, pairs in selectors[name]:
            if all(p in labels for p in pairs):
                sums[spec] = sums.get(spec, 0.0) + value
    return sums


def sample_from_prometheus(
    sums: Mapping[str, float], names: Mapping[str, tuple[str, ...]], t: float
) -> MonitorSample | None:
    values: dict[str, float] = {}
    for q in QUANTITIES:
        for name in names.get(q, ()):
            if name in sums:
                values[q] = sums[name]
                break
    return MonitorSample(t, **values) if values else None


def _number(v: object) -> float | None:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None


def _replica_count(v: object) -> float | None:
    """A number, or a list (or mapping) of replicas: those not marked unroutable."""
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, list):
        return float(sum(1 for r in v if not (isinstance(r, dict) and r.get("routable") is False)))
    return _number(v)


def _state_values(obj: dict) -> dict[str, float]:
    values: dict[str, float] = {}
    for q, keys in _STATE_KEYS.items():
        for key in keys:
            if key in obj:
                v = _replica_count(obj[key]) if q == "replicas" else _number(obj[key])
                if v is not None:
                    values[q] = v
                    break
    return values


def sample_from_state(obj: object, t: float) -> MonitorSample | None:
    """A replica's flat state, or a gateway's nested one (model -> version -> values):
    the values of every object that has them, summed."""
    totals: dict[str, float] = {}
    todo: list[tuple[object, int]] = [(obj, 0)]
    while todo:
        node, depth = todo.pop()
        if not isinstance(node, dict):
            continue
        found = _state_values(node)
        if found:
            for q, v in found.items():
                totals[q] = totals.get(q, 0.0) + v
        elif depth < _STATE_DEPTH:
            todo.extend((child, depth + 1) for child in node.values())
    return MonitorSample(t, **totals) if totals else None


def merge(a: MonitorSample | None, b: MonitorSample | None) -> MonitorSample | None:
    """``a``'s values, with ``b`` filling what ``a`` lacks."""
    if a is None or b is None:
        return a or b
    values = {q: getattr(a, q) if getattr(a, q) is not None else getattr(b, q) for q in QUANTITIES}
    return MonitorSample(a.t, **values)


# ---- polling ----------------------------------------------------------------------------
class Monitor:
    """Polls until ``stop`` is set; ``samples`` holds what it saw."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.samples: list[MonitorSample] = []
        self._wanted = {n for names in settings.metric_names.values() for n in names}
        self._use_state = self._use_metrics = False
        # built here, not in run(): loading the CA certificates takes tens of
        # milliseconds, which would hold up the first sends of the run
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(2.0), headers=dict(settings.headers), trust_env=False
        )

    async def run(self, run_start: float, stop: asyncio.Event) -> None:
        base = self.settings.base_url.rstrip("/")
        async with self._client as client:
            first = await self._poll(client, base, run_start, probe=True)
            if first is None:
                logger.debug("monitor: %s offers neither /state nor /metrics; skipping", base)
                return
            self.samples.append(first)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.interval_s)
                sample = await self._poll(client, base, run_start, probe=False)
                if sample is not None:
                    self.samples.append(sample)

    async def _poll(
        self, client: httpx.AsyncClient, base: str, run_start: float, *, probe: bool
    ) -> MonitorSample | None:
        t = time.perf_counter() - run_start
        state = metrics = None
        if probe or self._use_state:
            state = await self._get_state(client, base + "/state", t)
            self._use_state = self._use_state or (probe and state is not None)
        if probe or self._use_metrics:
            metrics = await self._get_metrics(client, base + "/metrics", t)
            self._use_metrics = self._use_metrics or (probe and metrics is not None)
        return merge(state, metrics)

    async def _get_state(
        self, client: httpx.AsyncClient, url: str, t: float
    ) -> MonitorSample | None:
        try:
            resp = await client.get(url)
            if resp.status_code != 200:
                return None
            return sample_from_state(resp.json(), t)
        except (httpx.HTTPError, ValueError):
            return None

    async def _get_metrics(
        self, client: httpx.AsyncClient, url: str, t: float
    ) -> MonitorSample | None:
        try:
            resp = await client.get(url)
            if resp.status_code != 200:
                return None
            sums = parse_prometheus(resp.text, self._wanted)
        except httpx.HTTPError:
            return None
        return sample_from_prometheus(sums, self.settings.metric_names, t)
