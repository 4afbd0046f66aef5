"""One replica's runtime: the engine, its lifecycle, admission and the admin actions.

Routes ask the :class:`Replica` to admit a request (a :class:`Ticket`, released when
its response is done), and to load, drain, sleep and wake. It reaches the engine
only through the narrow :class:`~lmfleet.engine.client.EngineClient` (``start``,
``generate``, ``abort_all``, ``stats``, ``sleep``, ``wake``, ``health``, ``shutdown``).

Admission (TGI's backpressure, answered at once instead of queued without bound):
- not READY → 503 with ``Retry-After`` (starting, draining, asleep, stopped);
- ``max_concurrent_requests`` generation requests already in flight → 429;
- the engine's waiting queue would pass ``max_waiting_requests`` → 429.
  The queue is estimated without a round trip to the engine thread: sequences in
  flight beyond ``max_num_seqs``, or the engine's last reported queue when it is
  longer (requests waiting for KV blocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import aclosing

from lmfleet.engine.client import EngineClient, connect_engine
from lmfleet.engine.request import FinishReason, SamplingParams
from lmfleet.engine.stats import EngineStats
from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.errors import EngineBusy
from lmfleet.fleet.replica_status import ReplicaLimits, ReplicaStatusReport
from lmfleet.server.errors import ApiError
from lmfleet.server.lifecycle import Lifecycle, ReplicaState
from lmfleet.server.metrics import ReplicaMetrics
from lmfleet.server.settings import ServerSettings

logger = logging.getLogger(__name__)

#: set to "0" on every answer refused before the request reached the engine
NOT_ADMITTED_HEADER = "x-lmfleet-admitted"

#: after a drain timeout aborts the rest, how long their responses get to finish
_ABORT_GRACE_S = 5.0
_IDLE_POLL_S = 0.05

_UNAVAILABLE = {
    ReplicaState.STARTING: ("starting", "loading", "the model is still loading; retry shortly"),
    ReplicaState.DRAINING: (
        "draining",
        "draining",
        "this replica is draining and admits no new requests; retry on another replica",
    ),
    ReplicaState.ASLEEP: (
        "asleep",
        "asleep",
        "this replica is asleep; POST /admin/wake first or retry on another replica",
    ),
    ReplicaState.STOPPED: ("stopped", "stopped", "this replica has stopped"),
}


class Ticket:
    """An admitted request's place; :meth:`release` (idempotent) when it is done."""

    __slots__ = ("_replica", "num_seqs", "released")

    def __init__(self, replica: Replica, num_seqs: int) -> None:
        self._replica = replica
        self.num_seqs = num_seqs
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._replica._release(self)


class Replica:
    def __init__(self, settings: ServerSettings, *, metrics: ReplicaMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ReplicaMetrics(settings.model_name, settings.version_label)
        self.lifecycle = Lifecycle(on_change=self._state_changed)
        self.engine: EngineClient | None = None
        self.max_model_len: int | None = None
        self.load_seconds: float | None = None  # reading the weights
        self.load_bytes: int | None = None
        self.startup_seconds: float | None = None  # process start to READY
        self.last_sleep_seconds: float | None = None
        self.last_wake_seconds: float | None = None
        self.error: str | None = None
        self.in_flight_requests = 0
        self.in_flight_seqs = 0
        self.on_stopped: Callable[[], None] | None = None
        self._created = time.monotonic()
        self._admin_lock = asyncio.Lock()
        self._drain_task: asyncio.Task[None] | None = None
        self.metrics.set_engine_stats_source(self.stats)

    # ---- reading ------------------------------------------------------------------------
    @property
    def state(self) -> ReplicaState:
        return self.lifecycle.state

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready and not self.engine_dead

    @property
    def engine_dead(self) -> bool:
        return self.engine is not None and self.engine.health().dead

    @property
    def exit_code(self) -> int:
        return 1 if self.error is not None else 0

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    @property
    def tokenizer(self) -> Tokenizer:
        engine = self.engine
        if engine is None or self.state is ReplicaState.STARTING or self.max_model_len is None:
            raise self._unavailable(ReplicaState.STARTING, record=False)
        if engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send token ids", code="no_tokenizer")
        return engine.tokenizer

    def check_model(self, name: str | None) -> str:
        """The served name to report; 404 for a model this replica does not serve."""
        names = self.settings.served_model_names
        if name is None or name == "":
            return names[0]
        if name in names:
            return name
        raise ApiError(
            404,
            f"The model `{name}` does not exist. This replica serves: {', '.join(names)}",
            param="model",
            code="model_not_found",
        )

    def status_report(self) -> ReplicaStatusReport:
        """What ``GET /state`` reports (every field set)."""
        s = self.stats()
        st = self.settings
        return ReplicaStatusReport(
            state=self.state.value,
            ready=self.ready,
            model=st.model_name,
            served_model_names=list(st.served_model_names),
            model_path=st.model,
            version=st.version_label,
            seconds_in_state=round(self.lifecycle.seconds_in_state, 3),
            uptime_seconds=round(time.monotonic() - self._created, 3),
            running=s.num_running if s else 0,
            waiting=s.num_waiting if s else 0,
            in_flight_requests=self.in_flight_requests,
            in_flight_sequences=self.in_flight_seqs,
            kv_cache_usage=s.kv_usage if s else 0.0,
            kv_blocks_total=s.num_blocks if s else 0,
            kv_blocks_free=s.num_free_blocks if s else 0,
            kv_blocks_in_use=(s.num_blocks - s.num_free_blocks) if s else 0,
            prefix_cache_hit_rate=s.prefix_hit_rate if s else 0.0,
            num_preemptions=s.num_preemptions if s else 0,
            max_model_len=self.max_model_len,
            load_seconds=self.load_seconds,
            load_bytes=self.load_bytes,
            load_bytes_per_second=(
                self.load_bytes / self.load_seconds
                if self.load_bytes is not None and self.load_seconds
                else None
            ),
            startup_seconds=self.startup_seconds,
            last_sleep_seconds=self.last_sleep_seconds,
            last_wake_seconds=self.last_wake_seconds,
            engine_dead=self.engine_dead,
            error=self.error,
            limits=ReplicaLimits(
                max_concurrent_requests=st.max_concurrent_requests,
                max_waiting_requests=st.max_waiting_requests,
                max_num_seqs=st.max_num_seqs,
                drain_timeout_s=st.drain_timeout_s,
            ),
        )

    # ---- loading ------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the weights, run a warm-up generation, then become READY. A failure
        is logged, kept in :attr:`error` and stops the replica (exit code 1)."""
        st = self.settings
        try:
            engine = connect_engine(
                st.engine_config(), progress=st.progress, engine_process=st.engine_process
            )
            self.engine = engine
            engine.on_dead = self._engine_died
            logger.info("loading %s (served as %s)", st.model, ", ".join(st.served_model_names))
            await engine.start()
            info = engine.info
            if info is None:  # start() returns only once the engine reported it
                raise RuntimeError("the engine started without reporting its limits")
            num_bytes, seconds, max_len = info.load_bytes, info.load_seconds, info.max_model_len
            self.load_bytes, self.load_seconds, self.max_model_len = num_bytes, seconds, max_len
            self.metrics.record_load(seconds, num_bytes)
            logger.info(
                "weights loaded: %.1f MB in %.2f s (%.1f MB/s); context length %d",
                num_bytes / 1e6,
                seconds,
                num_bytes / seconds / 1e6 if seconds > 0 else float("inf"),
                max_len,
            )
            if st.warmup:
                await self._warm_up(engine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("model load failed")
            self.error = f"model load failed: {exc}"
            self._stop()
            return
        if self.state is ReplicaState.STARTING:
            self.startup_seconds = time.monotonic() - self._created
            self.lifecycle.to(ReplicaState.READY)
            logger.info("ready after %.2f s", self.startup_seconds)

    async def _warm_up(self, engine: EngineClient) -> None:
        """One short generation, so the first user request pays no first-call costs."""
        t0 = time.perf_counter()
        prompt = engine.encode("warm up") if engine.tokenizer is not None else [0]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        async with aclosing(engine.generate(prompt, params, request_id="warmup")) as gen:
            async for _ in gen:
                pass
        logger.info("warm-up generation took %.3f s", time.perf_counter() - t0)

    # ---- admission ----------------------------------------------------------------------
    def check_accepting(self) -> None:
        """503 with Retry-After unless READY (and the engine alive)."""
        if self.state is not ReplicaState.READY:
            raise self._unavailable(self.state)
        if self.engine_dead:
            self.metrics.record_rejected("engine_dead")
            raise ApiError(
                503,
                "the engine stopped after an error; this replica must be restarted",
                code="engine_dead",
                headers=self._retry_after(),
            )

    def admit(self, num_seqs: int) -> Ticket:
        """Admit a request of ``num_seqs`` sequences now, or raise 503 / 429 at once.
        Synchronous: nothing can slip in between the check and the count."""
        self.check_accepting()
        st = self.settings
        if self.in_flight_requests >= st.max_concurrent_requests:
            self.metrics.record_rejected("too_many_requests")
            raise ApiError(
                429,
                f"this replica is at its limit of {st.max_concurrent_requests} concurrent "
                "requests; retry after a moment or on another replica",
                code="too_many_requests",
                headers=self._retry_after(),
            )
        if st.max_waiting_requests is not None:
            waiting = self.projected_waiting(num_seqs)
            if waiting > st.max_waiting_requests:
                self.metrics.record_rejected("queue_full")
                raise ApiError(
                    429,
                    f"the waiting queue is full ({st.max_waiting_requests} sequences); retry "
                    "after a moment or on another replica",
                    code="queue_full",
                    headers=self._retry_after(),
                )
        self.in_flight_requests += 1
        self.in_flight_seqs += num_seqs
        return Ticket(self, num_seqs)

    def projected_waiting(self, num_new: int) -> int:
        """How many sequences would wait in the engine if ``num_new`` more arrived."""
        by_slots = self.in_flight_seqs + num_new - self.settings.max_num_seqs
        s = self.stats()
        by_engine = s.num_waiting + num_new if s is not None and s.num_waiting > 0 else 0
        return max(by_slots, by_engine, 0)

    def _release(self, ticket: Ticket) -> None:
        self.in_flight_requests -= 1
        self.in_flight_seqs -= ticket.num_seqs

    def _retry_after(self) -> dict[str, str]:
        """Headers of a refusal before admission: when to come back, and that the
        request never reached the engine (the gateway may then send it elsewhere even
        when the code is ``engine_dead``)."""
        return {"Retry-After": str(self.settings.retry_after_s), NOT_ADMITTED_HEADER: "0"}

    def _unavailable(self, state: ReplicaState, *, record: bool = True) -> ApiError:
        reason, code, message = _UNAVAILABLE.get(state, ("unavailable", "unavailable", state))
        if record:
            self.metrics.record_rejected(reason)
        return ApiError(503, message, code=code, headers=self._retry_after())

    # ---- drain ------------------------------------------------------------------------
    def start_drain(self, timeout_s: float | None = None) -> bool:
        """Stop admitting, let what runs finish, then stop. Returns False when a drain
        is already under way (or the replica stopped). Safe to call from a signal
        handler scheduled onto the loop."""
        state = self.state
        if state in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            return False
        if state is ReplicaState.STARTING:
            logger.info("stop requested while starting: stopping without serving")
            self._stop()
            return True
        self.lifecycle.to(ReplicaState.DRAINING)
        timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        logger.info(
            "draining: %d requests in flight, up to %.1f s", self.in_flight_requests, timeout
        )
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout))
        return True

    async def _drain(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._wait_idle(), timeout_s)
            logger.info("drained: every request finished")
        except TimeoutError:
            logger.warning(
                "drain timeout (%.1f s): aborting %d requests (finish_reason=abort)",
                timeout_s,
                self.in_flight_requests,
            )
            if self.engine is not None:
                self.engine.abort_all(FinishReason.ABORT)
            try:
                await asyncio.wait_for(self._wait_idle(), _ABORT_GRACE_S)
            except TimeoutError:
                logger.error("%d responses still open after abort", self.in_flight_requests)
        self._stop()

    async def _wait_idle(self) -> None:
        while self.in_flight_requests > 0:
            await asyncio.sleep(_IDLE_POLL_S)

    def _engine_died(self, exc: BaseException) -> None:
        """The engine loop stopped: nothing this process serves can succeed any more.
        ``/health/live`` fails at once; after the grace the process exits with status
        1, so that its supervisor replaces it instead of keeping a replica that
        answers 503 forever."""
        delay = self.settings.exit_on_engine_dead_after_s
        if self.error is None:
            self.error = f"the engine died: {exc}"
        logger.error(
            "the engine died (%s); exiting in %.1f s so that a supervisor replaces this "
            "replica (--exit-on-engine-dead-after)",
            exc,
            delay,
        )
        asyncio.get_running_loop().call_later(delay, self._stop)

    def _stop(self) -> None:
        if self.state is ReplicaState.STOPPED:
            return
        if self.state in (ReplicaState.ASLEEP, ReplicaState.READY):  # the engine died
            self.lifecycle.to(ReplicaState.DRAINING)
        self.lifecycle.to(ReplicaState.STOPPED)
        if self.on_stopped is not None:
            self.on_stopped()

    async def shutdown(self) -> None:
        """Stop the engine loop (the lifespan's last act)."""
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()

    # ---- sleep and wake -------------------------------------------------------------------
    async def sleep(self) -> float:
        """Weights to host memory, KV cache freed; ASLEEP. Only with nothing in flight
        (409 otherwise). Returns the seconds it took (the last ones, if already asleep)."""
        async with self._admin_lock:
            if self.state is ReplicaState.ASLEEP:
                return self.last_sleep_seconds or 0.0
            if self.state is not ReplicaState.READY:
                raise _conflict(f"cannot sleep while {self.state.value}")
            self.lifecycle.to(ReplicaState.ASLEEP)  # admits nothing from here on
            if self.in_flight_requests:
                self.lifecycle.to(ReplicaState.READY)
                raise _conflict(
                    f"cannot sleep with {self.in_flight_requests} requests in flight; "
                    "drain them first"
                )
            engine = self._engine()
            try:
                seconds = await engine.sleep()
            except EngineBusy as exc:
                self.lifecycle.to(ReplicaState.READY)
                raise _conflict(str(exc)) from exc
            self.last_sleep_seconds = seconds
            self.metrics.record_sleep(seconds)
            logger.info("asleep: weights offloaded and KV cache freed in %.3f s", seconds)
            return seconds

    async def wake(self) -> float:
        """Weights back on the device, KV cache allocated; READY again."""
        async with self._admin_lock:
            if self.state is ReplicaState.READY:
                return 0.0
            if self.state is not ReplicaState.ASLEEP:
                raise _conflict(f"cannot wake while {self.state.value}")
            seconds = await self._engine().wake()
            self.last_wake_seconds = seconds
            self.metrics.record_wake(seconds)
            if self.state is ReplicaState.ASLEEP:  # a drain may have begun meanwhile
                self.lifecycle.to(ReplicaState.READY)
            logger.info("awake in %.3f s", seconds)
            return seconds

    def _engine(self) -> EngineClient:
        if self.engine is None:
            raise self._unavailable(ReplicaState.STARTING, record=False)
        return self.engine

    def _state_changed(self, old: ReplicaState, new: ReplicaState) -> None:
        self.metrics.set_state(new.value)
        logger.info("replica state: %s -> %s", old.value, new.value)


def _conflict(message: str) -> ApiError:
    return ApiError(409, message, code="invalid_state", type="conflict_error")
