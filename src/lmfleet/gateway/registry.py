"""Which versions each model has, which replicas serve each version, and which of
those may take traffic right now.

A replica takes traffic ("routable") only while its last ``/state`` poll said READY
and it is in rotation. Taking a replica **out of rotation** (the autoscaler does,
before a drain or a sleep) stops new traffic to it whatever its polls say; only
putting it back in rotation lets a READY poll re-admit it. Connection errors, a failed poll, STARTING, DRAINING, ASLEEP or STOPPED eject it; the
first poll that finds it READY again re-admits it. The proxy ejects at once (without
waiting for the next poll) when a connection fails or a replica answers 503.

The registry owns the gateway's in-flight count per replica and the admission queue
of each (model, version): the queue's capacity is the sum of ``max_inflight`` over the
routable replicas, so with no routable replica requests wait in the queue (scale from
zero) and are let through as soon as one turns READY.

Replicas come from the fleet file (``urls``), from :meth:`Registry.add_replica`
(the admin API: "dynamic") and from the autoscaler's provider ("provider", with the
provider's replica id); a reload replaces the file's replicas and keeps the others.
Each replica has a short stable id (a hash of its URL) for the admin API's paths.

A replica whose engine died (it answered 503 ``engine_dead``, or its ``/state`` says
so) is marked dead at once: no more traffic until a poll finds it READY again (it
was restarted).

Weights: the fleet file's, until an operator (admin ``PATCH``) or a rollout sets
one. A weight set at run time survives reloads as long as the file's weight for
that version stays what it was when the weight was set; once the file's weight
changes, the file wins (the operator edited it). A running rollout *locks* its two
versions' weights: reloads keep them whatever the file says.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lmfleet.fleet.config import (
    FleetConfig,
    ModelConfig,
    VersionConfig,
    check_replica_url,
    check_weight,
)
from lmfleet.fleet.replica_status import ReplicaStatusReport, describe_errors
from lmfleet.gateway.policies.admission import AdmissionQueue
from lmfleet.gateway.policies.balance import Balancer, ReplicaView, make_balancer
from lmfleet.gateway.upstream import ConnectFailed, UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)

#: replica states from /state that take traffic
_READY = "ready"
#: the state the gateway gives a replica whose engine died
ENGINE_DEAD = "engine_dead"
#: polls in a row that time out before a replica is ejected
_POLL_FAILURES = 3
#: seconds a ``/state`` poll may take
_POLL_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ReplicaInfo:
    """What the gateway knows about one replica."""

    url: str
    model: str
    version: str
    #: "config" (the fleet file), "dynamic" (the admin API) or "provider" (the autoscaler)
    source: str = "config"
    #: the provider's id of a replica the autoscaler runs
    provider_id: str | None = None
    #: False: no new traffic whatever its polls say (before a drain or a sleep)
    in_rotation: bool = True
    routable: bool = False
    state: str = "unknown"
    inflight: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    last_poll: float = 0.0
    last_error: str | None = None
    ejections: int = 0
    poll_failures: int = 0

    @property
    def replica_id(self) -> str:
        """The balancer's key for this replica."""
        return self.url

    @property
    def id(self) -> str:
        """A short stable id for the admin API's paths: the same URL, the same id."""
        return replica_id_of(self.url)

    def view(self, max_inflight: int | None) -> ReplicaView:
        return ReplicaView(
            replica_id=self.url,
            url=self.url,
            inflight=self.inflight,
            running=self.running,
            waiting=self.waiting,
            kv_usage=self.kv_usage,
            max_inflight=max_inflight,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "source": self.source,
            "provider_id": self.provider_id,
            "in_rotation": self.in_rotation,
            "routable": self.routable,
            "state": self.state,
            "inflight": self.inflight,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": self.kv_usage,
            "prefix_cache_hit_rate": self.prefix_hit_rate,
            "last_error": self.last_error,
            "ejections": self.ejections,
        }


@dataclass(slots=True)
class VersionEntry:
    """One version of a model: weight, replicas, balancer and admission queue."""

    model: str
    name: str
    weight: float
    served_model_name: str | None
    max_inflight: int
    balancer: Balancer
    queue: AdmissionQueue
    replicas: dict[str, ReplicaInfo] = field(default_factory=dict)
    #: sent on every call to this version's replicas (the replicas' API key)
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    #: set whenever a replica turns routable (resume waits on it)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def routable(self) -> list[ReplicaInfo]:
        return [r for r in self.replicas.values() if r.routable]

    def views(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[ReplicaView]:
        return [
            r.view(self.max_inflight)
            for r in self.replicas.values()
            if r.routable and r.url not in exclude
        ]

    def refresh_capacity(self) -> None:
        self.queue.set_capacity(self.max_inflight * len(self.routable()))


def replica_id_of(url: str) -> str:
    """``r`` + 10 hex digits of the blake2b hash of the URL (without trailing ``/``)."""
    return "r" + hashlib.blake2b(url.rstrip("/").encode(), digest_size=5).hexdigest()


@dataclass(slots=True)
class WeightOverride:
    """A weight set at run time, and the file's weight for that version when it was
    set (a reload keeps the override while the file's weight stays that)."""

    weight: float
    file_weight: float
    #: "operator" (admin API) or "rollout"
    owner: str
    #: a running rollout owns it: reloads keep it whatever the file says
    locked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "file_weight": self.file_weight,
                "owner": self.owner, "locked": self.locked}  # fmt: skip


@dataclass(slots=True)
class ModelEntry:
    config: ModelConfig
    versions: dict[str, VersionEntry]


class UnknownTarget(LookupError):
    """A model, version or replica the registry does not have."""


class Registry:
    """Models → versions → replicas, kept current by polling ``/state``."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        pool: UpstreamPool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._own_pool = pool is None
        self._task: asyncio.Task[None] | None = None
        self.models: dict[str, ModelEntry] = {}
        #: weights set at run time, by (model, version)
        self.overrides: dict[tuple[str, str], WeightOverride] = {}
        self.config = config
        self.apply_config(config)

    @property
    def pool(self) -> UpstreamPool | None:
        """The connections to the replicas (set once polling has started)."""
        return self._pool

    # ---- configuration ------------------------------------------------------------------
    def apply_config(self, config: FleetConfig) -> None:
        """Take a new fleet file: add and remove models and versions, set weights,
        replace the file's replicas (replicas added through the API stay). Requests
        in flight keep their replica and version objects, so nothing is dropped."""
        self.config = config
        wanted = {m.name for m in config.models}
        for name in list(self.models):
            if name not in wanted:
                del self.models[name]
        versions_now = {(m.name, v.name) for m in config.models for v in m.versions}
        for key in list(self.overrides):
            if key not in versions_now:
                del self.overrides[key]
        for mcfg in config.models:
            entry = self.models.get(mcfg.name)
            versions = entry.versions if entry else {}
            new_versions: dict[str, VersionEntry] = {}
            for vcfg in mcfg.versions:
                new_versions[vcfg.name] = self._version(mcfg, vcfg, versions.get(vcfg.name))
            self.models[mcfg.name] = ModelEntry(config=mcfg, versions=new_versions)

    def _version(
        self, mcfg: ModelConfig, vcfg: VersionConfig, old: VersionEntry | None
    ) -> VersionEntry:
        q = mcfg.queue
        prev = self.models[mcfg.name].config if old is not None else None
        entry = VersionEntry(
            model=mcfg.name,
            name=vcfg.name,
            weight=self._weight_on_load(mcfg.name, vcfg),
            served_model_name=vcfg.served_model_name,
            upstream_headers=(
                [("authorization", f"Bearer {key}")] if (key := vcfg.upstream_key()) else []
            ),
            max_inflight=q.max_inflight_per_replica,
            balancer=(
                old.balancer
                if old is not None and prev is not None and prev.balancing == mcfg.balancing
                else make_balancer(mcfg.balancing.policy, **mcfg.balancing.params)
            ),
            # requests waiting in the old queue keep waiting there only if it stays
            queue=(
                old.queue
                if old is not None and prev is not None and prev.queue == q
                else AdmissionQueue(q.max_queue, q.max_wait_s, self._clock)
            ),
        )
        if old is not None:
            entry.replicas = old.replicas
            entry.changed = old.changed
        # the file's replicas are replaced; dynamic ones stay
        for url, info in list(entry.replicas.items()):
            if info.source == "config" and url not in vcfg.urls:
                self._drop(entry, url)
        for url in vcfg.urls:
            entry.replicas.setdefault(url, ReplicaInfo(url, mcfg.name, vcfg.name))
        entry.refresh_capacity()
        return entry

    def _weight_on_load(self, model: str, vcfg: VersionConfig) -> float:
        """The file's weight, unless a weight set at run time still holds (see the
        module docstring)."""
        o = self.overrides.get((model, vcfg.name))
        if o is None:
            return vcfg.weight
        if o.locked or o.file_weight == vcfg.weight:
            if o.weight != vcfg.weight:
                why = (
                    "a running rollout owns it"
                    if o.locked
                    else (f"set by the {o.owner}; the file's weight applies once it changes")
                )
                logger.info("weight of %s/%s stays %g, not the file's %g: %s", model,
                            vcfg.name, o.weight, vcfg.weight, why)  # fmt: skip
            return o.weight
        logger.info("weight of %s/%s: the fleet file's new weight %g replaces %g (set by "
                    "the %s)", model, vcfg.name, vcfg.weight, o.weight, o.owner)  # fmt: skip
        del self.overrides[(model, vcfg.name)]
        return vcfg.weight

    def restore_overrides(self, overrides: dict[tuple[str, str], WeightOverride]) -> None:
        """Weights set at run time by an earlier process (the state file): applied
        under the same rule as a reload."""
        for (model, version), o in overrides.items():
            mcfg = self.config.model(model)
            vcfg = mcfg.version(version) if mcfg is not None else None
            if vcfg is None:
                continue
            self.overrides[(model, version)] = o
            self.version(model, version).weight = self._weight_on_load(model, vcfg)

    # ---- lookups ------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownTarget(f"model {name!r}") from None

    def version(self, model: str, version: str) -> VersionEntry:
        try:
            return self.model(model).versions[version]
        except KeyError:
            raise UnknownTarget(f"version {version!r} of model {model!r}") from None

    def all_versions(self) -> list[VersionEntry]:
        return [v for m in self.models.values() for v in m.versions.values()]

    # ---- run-time changes ---------------------------------------------------------------
    def add_replica(
        self, model: str, version: str, url: str, *, source: str = "dynamic",
        provider_id: str | None = None,
    ) -> ReplicaInfo:  # fmt: skip
        """Register a replica (not routable until a poll finds it READY). ``ValueError``
        for a URL that could never be routed to (scheme, host, port)."""
        entry = self.version(model, version)
        url = check_replica_url(url)
        info = entry.replicas.get(url)
        if info is None:
            info = entry.replicas[url] = ReplicaInfo(
                url, model, version, source=source, provider_id=provider_id
            )
        return info

    def set_rotation(self, replica: ReplicaInfo, in_rotation: bool, reason: str) -> None:
        """Out of rotation: no new request reaches ``replica`` from now on (those it
        holds go on). Back in rotation: the next READY poll re-admits it."""
        if replica.in_rotation == in_rotation:
            return
        replica.in_rotation = in_rotation
        logger.info("replica %s (%s/%s) %s rotation: %s", replica.url, replica.model,
                    replica.version, "back in" if in_rotation else "out of", reason)  # fmt: skip
        if not in_rotation:
            replica.routable = False
            entry = self._entry_of(replica)
            if entry is not None:
                entry.refresh_capacity()

    def replica_by_provider_id(self, provider_id: str) -> ReplicaInfo | None:
        for entry in self.all_versions():
            for info in entry.replicas.values():
                if info.provider_id == provider_id:
                    return info
        return None

    async def poll_replica(self, replica: ReplicaInfo) -> None:
        """Read one replica's ``/state`` now (the autoscaler, once it turned READY),
        instead of waiting for the next round of polls."""
        await self._poll(replica)

    def remove_replica(self, model: str, version: str, url: str) -> None:
        entry = self.version(model, version)
        url = url.rstrip("/")
        if url not in entry.replicas:
            raise UnknownTarget(f"replica {url} of {model}/{version}")
        self._drop(entry, url)
        entry.refresh_capacity()

    def replica_by_id(self, model: str, version: str, replica_id: str) -> ReplicaInfo:
        entry = self.version(model, version)
        for info in entry.replicas.values():
            if info.id == replica_id:
                return info
        raise UnknownTarget(f"replica {replica_id} of {model}/{version}")

    def _drop(self, entry: VersionEntry, url: str) -> None:
        entry.replicas.pop(url, None)
        entry.balancer.forget(url)

    def set_weight(
        self, model: str, version: str, weight: float, *, owner: str = "operator",
        locked: bool = False,
    ) -> None:  # fmt: skip
        """A weight set at run time (it survives reloads, see the module docstring).
        ``ValueError`` unless finite and ≥ 0."""
        weight = check_weight(weight)
        entry = self.version(model, version)
        mcfg = self.config.model(model)
        vcfg = mcfg.version(version) if mcfg is not None else None
        file_weight = vcfg.weight if vcfg is not None else entry.weight
        entry.weight = weight
        self.overrides[(model, version)] = WeightOverride(weight, file_weight, owner, locked)

    def mark_dead(self, replica: ReplicaInfo, reason: str) -> None:
        """The replica's engine died: no traffic until a poll finds it READY again."""
        replica.state = ENGINE_DEAD
        self.eject(replica, reason)

    def eject(self, replica: ReplicaInfo, reason: str) -> None:
        """Stop routing to ``replica`` now; the next READY poll re-admits it."""
        if replica.routable:
            replica.ejections += 1
            logger.warning(
                "ejecting replica %s (%s/%s): %s", replica.url, replica.model, replica.version,
                reason,
            )  # fmt: skip
        replica.routable = False
        replica.last_error = reason
        entry = self._entry_of(replica)
        if entry is not None:
            entry.refresh_capacity()

    def _entry_of(self, replica: ReplicaInfo) -> VersionEntry | None:
        m = self.models.get(replica.model)
        return m.versions.get(replica.version) if m else None

    # ---- polling ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._pool is None:
            self._pool = UpstreamPool()
        await self.poll_once()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="gateway-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_pool and self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop polling for good
                logger.exception("polling replicas failed")

    async def poll_once(self) -> None:
        replicas = [r for v in self.all_versions() for r in v.replicas.values()]
        if replicas:
            await asyncio.gather(*(self._poll(r) for r in replicas))
        for entry in self.all_versions():
            entry.refresh_capacity()

    async def _poll(self, replica: ReplicaInfo) -> None:
        if self._pool is None:
            raise RuntimeError("Registry.start() was not called")
        try:
            status, raw = await self._pool.fetch(
                replica.url, "/state", method="GET", timeout=_POLL_TIMEOUT_S,
                connect_timeout=self.config.gateway.timeouts.connect_s,
            )  # fmt: skip
            data = json.loads(raw) if status == 200 else None
        except (UpstreamError, TimeoutError, ValueError) as exc:
            replica.poll_failures += 1
            # refused: gone now; a timeout may be a busy replica: eject after a few
            if isinstance(exc, ConnectFailed) or replica.poll_failures >= _POLL_FAILURES:
                self._set_unroutable(replica, "unreachable", f"/state: {type(exc).__name__}")
            return
        replica.poll_failures = 0
        replica.last_poll = self._clock()
        if status != 200:
            self._set_unroutable(replica, "unknown", f"/state answered {status}")
            return
        try:
            report = ReplicaStatusReport.model_validate(data)
        except ValidationError as exc:
            self._set_unroutable(replica, "unknown", f"/state is malformed: {describe_errors(exc)}")
            return
        replica.running = report.running
        replica.waiting = report.waiting
        replica.kv_usage = report.kv_cache_usage
        replica.prefix_hit_rate = report.prefix_cache_hit_rate
        state: str = ENGINE_DEAD if report.engine_dead else report.state
        if state == _READY and report.ready and not replica.in_rotation:
            replica.state = state  # READY, but leaving: no new traffic
        elif state == _READY and report.ready:
            if not replica.routable:
                logger.info("replica %s (%s/%s) is ready", replica.url, replica.model,
                            replica.version)  # fmt: skip
            replica.state = state
            replica.routable = True
            replica.last_error = None
            entry = self._entry_of(replica)
            if entry is not None:
                entry.refresh_capacity()
                entry.changed.set()
                entry.changed = asyncio.Event()
        else:
            self._set_unroutable(replica, state, f"state {state}")

    def _set_unroutable(self, replica: ReplicaInfo, state: str, reason: str) -> None:
        replica.state = state
        if replica.routable:
            self.eject(replica, reason)
        else:
            replica.last_error = reason

    async def wait_routable(self, model: str, version: str, timeout_s: float) -> bool:
        """Wait until the version has a routable replica; False after ``timeout_s``."""
        entry = self.version(model, version)
        deadline = self._clock() + timeout_s
        while not entry.routable():
            left = deadline - self._clock()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), left)
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            m: {
                v.name: {
                    "weight": v.weight,
                    "queue_depth": v.queue.depth,
                    "inflight": v.queue.inflight,
                    "replicas": [r.snapshot() for r in v.replicas.values()],
                }
                for v in entry.versions.values()
            }
            for m, entry in self.models.items()
        }
