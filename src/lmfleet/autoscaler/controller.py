"""The control loop: observe the gateway and the provider, decide with the policy,
act through the provider.

Every ``interval_s`` (the fleet file's ``autoscaler.interval_s``), for each managed
version (one that names a ``model``):

1. **forget the dead**: a replica the provider reports DEAD (exited unasked, failing
   liveness, never READY within its load budget) is removed from the gateway and
   the provider; the policy then sees one replica fewer and replaces it. Streams it
   was serving are resumed by the gateway on another replica.
2. **observe**: per replica the provider's state, overridden by the action in
   progress (a replica being put to sleep counts as ASLEEP, being drained as
   DRAINING, being woken as WAKING: the policy's contract), and its load: the
   larger of the gateway's outstanding count and the replica's own ``running +
   waiting`` (each lags the other by a poll). The version's queue is the gateway's
   admission queue; arrival rate and TTFT/TPOT p90 come from the gateway's recent
   window; time-to-ready and wake time are measured here.
3. **decide**: the version's policy (``autoscaling.policy``), pure:
   :func:`lmfleet.autoscaler.policy.decide` (``lmfleet``) or the KEDA + HPA baseline
   :func:`lmfleet.autoscaler.baselines.keda_hpa` (``keda``); the decision, its
   reason and inputs go to the log (when it acts or ``desired`` changes) and to a
   bounded history (``GET /admin/autoscaler``).
4. **act** (not in dry-run), each action a task of its own so a slow one never holds
   the loop:

   - start: the provider launches a replica; once READY it is registered with the
     gateway and polled at once, so it takes traffic within a poll;
   - wake: back in rotation, the provider wakes it, polled at once;
   - sleep: out of rotation, wait until neither the gateway nor the replica holds a
     request, then the provider puts it to sleep (back in rotation if that fails);
   - drain: out of rotation, the provider drains it (the replica finishes what it
     runs, up to its drain timeout, and exits; SIGKILL only after a grace), then it
     is removed from the gateway. A STARTING or ASLEEP victim is just stopped.

A replica the policy names while an action on it is in progress is left alone.
The controller never touches replicas of static ``urls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmfleet.autoscaler.baselines import KedaConfig, KedaState, keda_hpa
from lmfleet.autoscaler.observation import (
    AutoscalingConfig,
    Decision,
    PolicyState,
    ReplicaPhase,
    ReplicaView,
    VersionObservation,
)
from lmfleet.autoscaler.policy import decide
from lmfleet.autoscaler.providers.base import (
    Provider,
    ProviderError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStatus,
)
from lmfleet.fleet.config import FleetConfig, ModelConfig, VersionConfig
from lmfleet.gateway.registry import ReplicaInfo, UnknownTarget
from lmfleet.gateway.state import GatewayState

logger = logging.getLogger(__name__)

#: measured cold starts and wakes kept per version (their median is the figure)
_MEASUREMENTS = 8
#: how often a replica waiting to be put to sleep is checked for idleness
_IDLE_POLL_S = 0.2

#: a policy: (observation, its config, its state or None) -> decision
Decider = Callable[[VersionObservation, Any, Any], Decision]

#: ``autoscaling.policy`` -> the function that decides
POLICIES: dict[str, Decider] = {"lmfleet": decide, "keda": keda_hpa}


def version_key(model: str, version: str) -> str:
    """How the provider groups a version's replicas: ``model/version``."""
    return f"{model}/{version}"


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision as the history keeps it."""

    t: float
    wall_time: float
    model: str
    version: str
    desired: int
    standby: int
    start: int
    wake: tuple[str, ...]
    sleep: tuple[str, ...]
    drain: tuple[str, ...]
    reason: str
    inputs: dict[str, Any]
    dry_run: bool

    @property
    def acts(self) -> bool:
        return bool(self.start or self.wake or self.sleep or self.drain)

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.wall_time,
            "model": self.model,
            "version": self.version,
            "desired": self.desired,
            "standby": self.standby,
            "start": self.start,
            "wake": list(self.wake),
            "sleep": list(self.sleep),
            "drain": list(self.drain),
            "reason": self.reason,
            "inputs": self.inputs,
            "dry_run": self.dry_run,
        }


@dataclass(slots=True)
class _Version:
    """What the controller keeps per managed version."""

    model: str
    name: str
    spec: ReplicaSpec
    #: ``autoscaling.policy``, its function and its config
    policy_name: str
    decide: Decider
    policy: AutoscalingConfig | KedaConfig
    enabled: bool
    #: the policy's state (None before its first decision)
    state: PolicyState | KedaState | None = None
    last: Decision | None = None
    #: the last decision put in the history
    last_kept: DecisionRecord | None = None
    time_to_ready: deque[float] = field(default_factory=lambda: deque(maxlen=_MEASUREMENTS))
    wake: deque[float] = field(default_factory=lambda: deque(maxlen=_MEASUREMENTS))
    #: replica ids whose cold start was already measured
    measured: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return version_key(self.model, self.name)


def replica_spec(mcfg: ModelConfig, vcfg: VersionConfig) -> ReplicaSpec:
    """What the provider runs for one replica of a managed version: the version's
    model and engine arguments, serving the name the gateway sends upstream."""
    assert vcfg.model is not None
    served = vcfg.served_model_name or mcfg.name
    return ReplicaSpec(
        model=vcfg.model,
        version=version_key(mcfg.name, vcfg.name),
        engine_args=(
            *vcfg.serve_args(),
            "--served-model-name",
            served,
            "--version-label",
            vcfg.name,
        ),
        env=vcfg.env,
        load_timeout_s=vcfg.load_timeout_s,
        drain_timeout_s=vcfg.drain_timeout_s,
    )


class Controller:
    """The autoscaler's loop for the managed versions of a fleet; see the module
    docstring. ``clock`` is the policy's clock (monotonic seconds)."""

    def __init__(
        self,
        gateway: GatewayState,
        provider: Provider,
        config: FleetConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        dry_run: bool | None = None,
    ) -> None:
        self.gateway = gateway
        self.provider = provider
        self.clock = clock
        self.dry_run = config.autoscaler.dry_run if dry_run is None else dry_run
        self.interval_s = config.autoscaler.interval_s
        self.history: deque[DecisionRecord] = deque(maxlen=config.autoscaler.history)
        self.versions: dict[str, _Version] = {}
        self._actions: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._errors: deque[str] = deque(maxlen=32)
        self.ticks = 0
        self.apply_config(config)

    # ---- configuration ------------------------------------------------------------------
    def apply_config(self, config: FleetConfig) -> None:
        """A reload: new managed versions are scaled from the next tick; a version
        gone from the file has its replicas drained."""
        self.interval_s = config.autoscaler.interval_s
        wanted: dict[str, _Version] = {}
        for mcfg, vcfg in config.managed():
            key = version_key(mcfg.name, vcfg.name)
            old = self.versions.get(key)
            name = vcfg.autoscaling.policy
            v = _Version(
                model=mcfg.name, name=vcfg.name, spec=replica_spec(mcfg, vcfg),
                policy_name=name, decide=POLICIES[name], policy=vcfg.policy_config(),
                enabled=vcfg.autoscaling.enabled,
            )  # fmt: skip
            if old is not None:
                if old.policy_name == name:  # another policy starts from its own state
                    v.state = old.state
                v.last, v.last_kept = old.last, old.last_kept
                v.time_to_ready, v.wake, v.measured = old.time_to_ready, old.wake, old.measured
            wanted[key] = v
        gone = set(self.versions) - set(wanted)
        self.versions = wanted
        for key in gone:
            logger.info("autoscaler: %s left the fleet file; draining its replicas", key)
            self._spawn_soon(self._retire_version(key))

    async def _retire_version(self, key: str) -> None:
        for h in await self.provider.list():
            if h.version == key and h.id not in self._actions:
                self._act(h.id, "drain", self._drain(None, h))

    # ---- the loop -----------------------------------------------------------------------
    async def start(self) -> None:
        """Decide once now (so ``min`` replicas start at once), then every interval."""
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="autoscaler")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception as exc:  # a bug here must not stop scaling for good
                logger.exception("autoscaler: a control loop round failed")
                self._errors.append(f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Stop deciding and cancel the actions in progress (the provider's
        ``close`` then stops every replica)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = [t for _, t in self._actions.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._actions.clear()

    async def tick(self) -> list[DecisionRecord]:
        """One round for every managed version; returns the decisions made."""
        self.ticks += 1
        handles = await self.provider.list()
        handles = await self._forget_dead(handles)
        records = []
        for v in list(self.versions.values()):
            mine = [h for h in handles if h.version == v.key]
            self._measure(v, mine)
            self._register_ready(v, mine)
            if not v.enabled:
                continue
            obs = self.observe(v, mine)
            decision = v.decide(obs, v.policy, v.state)
            v.state, v.last = decision.state, decision
            record = self._record(v, decision)
            records.append(record)
            if not self.dry_run:
                await self._apply(v, decision, mine)
        return records

    # ---- observe ------------------------------------------------------------------------
    def observe(self, v: _Version, handles: list[ReplicaHandle]) -> VersionObservation:
        """The policy's view of one version now (see the module docstring)."""
        views = []
        for h in handles:
            phase = self._phase(h)
            if phase is None:
                continue
            info = self._info(h)
            gw = info.inflight if info is not None else 0
            held = info.running + info.waiting if info is not None else 0
            in_flight = max(gw, held)
            waiting = min(info.waiting if info is not None else 0, in_flight)
            view = ReplicaView(h.id, phase, in_flight=in_flight, waiting=waiting, since=h.since)
            views.append(view)
        try:
            entry = self.gateway.registry.version(v.model, v.name)
            queue_depth = entry.queue.depth
        except UnknownTarget:
            queue_depth = 0
        window = self.gateway.version_stats.window(v.model, v.name)
        return VersionObservation(
            now=self.clock(),
            version=v.key,
            queue_depth=queue_depth,
            replicas=tuple(views),
            arrival_rate=window.arrival_rate,
            output_tokens_per_s=window.output_tokens_per_s,
            ttft_p90_s=window.ttft_p90_s,
            tpot_p90_s=window.tpot_p90_s,
            time_to_ready_s=statistics.median(v.time_to_ready) if v.time_to_ready else None,
            wake_s=statistics.median(v.wake) if v.wake else None,
        )

    def _phase(self, h: ReplicaHandle) -> ReplicaPhase | None:
        action = self._actions.get(h.id)
        if action is not None:
            verb = action[0]
            if verb == "drain":
                return ReplicaPhase.DRAINING
            if verb == "sleep":
                return ReplicaPhase.ASLEEP
            if verb == "wake" and h.state is not ReplicaStatus.READY:
                return ReplicaPhase.WAKING
        return h.state.phase

    def _info(self, h: ReplicaHandle) -> ReplicaInfo | None:
        return self.gateway.registry.replica_by_provider_id(h.id)

    def _measure(self, v: _Version, handles: list[ReplicaHandle]) -> None:
        for h in handles:
            ttr = h.time_to_ready_s
            if ttr is not None and h.id not in v.measured:
                v.measured.add(h.id)
                v.time_to_ready.append(ttr)
                self.gateway.version_stats.note_time_to_ready(v.model, v.name, ttr)

    async def _forget_dead(self, handles: list[ReplicaHandle]) -> list[ReplicaHandle]:
        alive = []
        for h in handles:
            if h.state is not ReplicaStatus.DEAD or h.id in self._actions:
                alive.append(h)
                continue
            logger.warning("autoscaler: replica %s of %s died (%s); replacing it", h.id,
                           h.version, h.detail or "no detail")  # fmt: skip
            self._unregister(h.id)
            try:
                await self.provider.stop(h.id, grace_s=0)
            except ProviderError as exc:
                logger.warning("autoscaler: forgetting %s: %s", h.id, exc)
        return alive

    def _register_ready(self, v: _Version, handles: list[ReplicaHandle]) -> None:
        """A READY replica the gateway does not know yet (started by an earlier
        round, or woken) is registered; the poller admits it."""
        for h in handles:
            if h.state is ReplicaStatus.READY and h.url and self._info(h) is None:
                if h.id in self._actions and self._actions[h.id][0] in ("drain", "sleep"):
                    continue
                self._register(v, h)

    def _register(self, v: _Version, h: ReplicaHandle) -> ReplicaInfo | None:
        assert h.url is not None
        try:
            return self.gateway.registry.add_replica(
                v.model, v.name, h.url, source="provider", provider_id=h.id
            )
        except UnknownTarget:
            return None  # the version left the fleet file meanwhile

    def _unregister(self, provider_id: str) -> None:
        info = self.gateway.registry.replica_by_provider_id(provider_id)
        if info is not None:
            with contextlib.suppress(UnknownTarget):
                self.gateway.registry.remove_replica(info.model, info.version, info.url)

    # ---- decide -------------------------------------------------------------------------
    def _record(self, v: _Version, d: Decision) -> DecisionRecord:
        """Log and keep a decision that acts or changes ``desired`` (the first one of a
        version too); quiet rounds that hold are only the version's ``last``."""
        record = DecisionRecord(
            t=self.clock(), wall_time=time.time(), model=v.model, version=v.name,
            desired=d.desired, standby=d.standby, start=d.start, wake=d.wake,
            sleep=d.sleep, drain=d.drain, reason=d.reason, inputs=dict(d.inputs),
            dry_run=self.dry_run,
        )  # fmt: skip
        before = v.last_kept
        if d.acts or before is None or before.desired != d.desired:
            logger.info("autoscaler %s%s: %s", v.key, " (dry run)" if self.dry_run else "",
                        d.reason)  # fmt: skip
            self.history.append(record)
            v.last_kept = record
        return record

    # ---- act ----------------------------------------------------------------------------
    async def _apply(self, v: _Version, d: Decision, handles: list[ReplicaHandle]) -> None:
        by_id = {h.id: h for h in handles}
        for _ in range(d.start):
            try:
                h = await self.provider.start(v.spec)
            except ProviderError as exc:
                logger.error("autoscaler %s: starting a replica failed: %s", v.key, exc)
                self._errors.append(f"start {v.key}: {exc}")
                break
            self._act(h.id, "start", self._bring_up(v, h))
        for rid in d.wake:
            if rid in by_id and rid not in self._actions:
                self._act(rid, "wake", self._wake(v, by_id[rid]))
        for rid in d.sleep:
            if rid in by_id and rid not in self._actions:
                self._act(rid, "sleep", self._sleep(v, by_id[rid]))
        for rid in d.drain:
            if rid in by_id and (rid not in self._actions or self._actions[rid][0] == "start"):
                self._cancel(rid)
                self._act(rid, "drain", self._drain(v, by_id[rid]))

    def _act(self, rid: str, verb: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"autoscaler-{verb}-{rid}")
        self._actions[rid] = (verb, task)
        task.add_done_callback(lambda t: self._done(rid, verb, t))

    def _spawn_soon(self, coro: Any) -> None:
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing runs to retire
            asyncio.get_running_loop().create_task(coro)
            return
        coro.close()

    def _cancel(self, rid: str) -> None:
        action = self._actions.pop(rid, None)
        if action is not None:
            action[1].cancel()

    def _done(self, rid: str, verb: str, task: asyncio.Task[None]) -> None:
        current = self._actions.get(rid)
        if current is not None and current[1] is task:
            del self._actions[rid]
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ProviderError):
            logger.warning("autoscaler: %s %s: %s", verb, rid, exc)
            self._errors.append(f"{verb} {rid}: {exc}")
        elif exc is not None:
            logger.error("autoscaler: %s %s failed", verb, rid, exc_info=exc)
            self._errors.append(f"{verb} {rid}: {type(exc).__name__}: {exc}")

    async def _bring_up(self, v: _Version, h: ReplicaHandle) -> None:
        ready = await self.provider.wait_ready(h.id)
        self._measure(v, [ready])
        info = self._register(v, ready)
        if info is not None:
            await self.gateway.registry.poll_replica(info)

    async def _wake(self, v: _Version, h: ReplicaHandle) -> None:
        info = self._info(h)
        t0 = self.clock()
        woke = await self.provider.wake(h.id)
        took = woke.wake_s if woke.wake_s is not None else self.clock() - t0
        v.wake.append(took)
        self.gateway.version_stats.note_wake(v.model, v.name, took)
        info = info or self._register(v, woke)
        if info is not None:
            self.gateway.registry.set_rotation(info, True, "woken")
            await self.gateway.registry.poll_replica(info)

    async def _sleep(self, v: _Version, h: ReplicaHandle) -> None:
        info = self._info(h)
        if info is not None:
            self.gateway.registry.set_rotation(info, False, "going to sleep (standby)")
            await self._until_idle(info)
        try:
            await self.provider.sleep(h.id)
        except ProviderError:
            if info is not None:
                self.gateway.registry.set_rotation(info, True, "sleep failed")
            raise

    async def _until_idle(self, info: ReplicaInfo) -> None:
        registry = self.gateway.registry
        while True:
            await registry.poll_replica(info)
            if info.inflight == 0 and info.running == 0 and info.waiting == 0:
                return
            await asyncio.sleep(_IDLE_POLL_S)

    async def _drain(self, v: _Version | None, h: ReplicaHandle) -> None:
        info = self._info(h)
        if info is not None:
            held = max(info.inflight, info.running + info.waiting)
            logger.info("autoscaler: draining %s with %d request(s) in flight", h.id, held)
            self.gateway.registry.set_rotation(info, False, "draining (scale-down)")
        try:
            if h.state in (ReplicaStatus.STARTING, ReplicaStatus.ASLEEP, ReplicaStatus.WAKING):
                await self.provider.stop(h.id)
            else:
                await self.provider.drain(h.id)
        finally:
            self._unregister(h.id)

    # ---- reporting ----------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """``GET /admin/autoscaler``: per version the last decision, the replicas as
        the provider sees them and the measured start and wake times; the history."""
        handles = await self.provider.list()
        versions = {}
        for v in self.versions.values():
            mine = [h for h in handles if h.version == v.key]
            last = v.last
            versions[v.key] = {
                "model": v.model,
                "version": v.name,
                "enabled": v.enabled,
                "policy": v.policy_name,
                "min": v.policy.min_replicas,
                "max": v.policy.max_replicas,
                "standby": v.policy.standby,
                "desired": last.desired if last else None,
                "reason": last.reason if last else None,
                "time_to_ready_s": statistics.median(v.time_to_ready) if v.time_to_ready
                else None,
                "wake_s": statistics.median(v.wake) if v.wake else None,
                "replicas": [self._replica_json(h) for h in mine],
            }  # fmt: skip
        return {
            "dry_run": self.dry_run,
            "interval_s": self.interval_s,
            "ticks": self.ticks,
            "versions": versions,
            "decisions": [r.to_dict() for r in self.history],
            "errors": list(self._errors),
        }

    def _replica_json(self, h: ReplicaHandle) -> dict[str, Any]:
        info = self._info(h)
        action = self._actions.get(h.id)
        now = time.monotonic()
        return {
            "id": h.id,
            "state": str(h.state),
            "phase": str(self._phase(h) or "stopped"),
            "action": action[0] if action else None,
            "url": h.url,
            "pid": h.pid,
            "log": str(h.log_path) if h.log_path else None,
            "age_s": round(now - h.started_at, 3),
            "in_state_s": round(now - h.since, 3),
            "time_to_ready_s": h.time_to_ready_s,
            "gateway_id": info.id if info else None,
            "routable": info.routable if info else False,
            "in_rotation": info.in_rotation if info else None,
            "inflight": info.inflight if info else 0,
            "running": info.running if info else 0,
            "waiting": info.waiting if info else 0,
            "detail": h.detail,
        }
