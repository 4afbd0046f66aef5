"""The engine core: one step is schedule → run → update.

``EngineCore`` is synchronous and single-threaded. The offline ``LLM`` drives it in a
loop; the async engine drives it from a background thread or its own process
(:mod:`lmfleet.engine.core_commands`). It reaches its runner only through the
:class:`~lmfleet.engine.runner_base.Runner` protocol.

With async scheduling (on by default on CUDA) a step overlaps the host work around
it with the device work: ``step()`` schedules and launches step n+1 while step n
still runs, then waits for step n's tokens and turns them into outputs. Step n+1
takes n's tokens on the device. The host's scheduling, input packing, stop checks
and output building then hide behind the GPU's forward instead of adding to it.
"""

from __future__ import annotations

import logging
import time

from lmfleet.engine.config import SIM_PREFIX, EngineConfig
from lmfleet.engine.faults import STEP, fault_injector
from lmfleet.engine.kv import KVCacheManager
from lmfleet.engine.limits import EngineLimits, check_request
from lmfleet.engine.outputs import EngineCoreOutput, SchedulerOutput
from lmfleet.engine.request import FinishReason, Request
from lmfleet.engine.runner_base import LaunchedWork, Runner
from lmfleet.engine.scheduler import Scheduler
from lmfleet.engine.stats import EngineInfo, EngineStats
from lmfleet.errors import DuplicateRequestId, EngineBusy

__all__ = ["EngineCore", "EngineStats", "build_runner"]

logger = logging.getLogger(__name__)


def build_runner(config: EngineConfig, *, progress: bool = True) -> Runner:
    """A real model runner, or the simulated accelerator for ``sim:PROFILE`` models
    (which then never imports torch)."""
    if config.model.model.startswith(SIM_PREFIX):
        from lmfleet.engine.sim import SimRunner

        return SimRunner(config.model, config.cache, progress=progress)
    from lmfleet.engine.runner import ModelRunner

    return ModelRunner(config.model, config.cache, config.scheduler, progress=progress)


def _async_scheduling(config: EngineConfig, runner: Runner) -> bool:
    """The configured choice; by default the runner's preference (on for a model on
    CUDA, where the host work of one step can overlap the device work of another)."""
    choice = config.scheduler.async_scheduling
    if choice is not None:
        return choice
    return runner.prefers_async_scheduling


class EngineCore:
    def __init__(self, config: EngineConfig, *, progress: bool = True) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.runner: Runner = build_runner(config, progress=progress)
        self.model_dir = self.runner.model_dir
        arch = self.runner.arch
        self.vocab_size = arch.vocab_size
        self.eos_token_ids = frozenset(arch.eos_token_id)
        self.max_model_len = config.model.max_model_len or arch.max_position_embeddings
        layout = self.runner.plan_kv_cache()
        self.runner.allocate_kv_cache(layout)
        self.kv = KVCacheManager(
            layout.num_blocks,
            layout.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
        )
        # A sequence also ends when it alone would fill the whole KV cache.
        capacity = layout.num_blocks * layout.block_size
        self.scheduler = Scheduler(config.scheduler, self.kv, min(self.max_model_len, capacity))
        self.limits = EngineLimits(self.max_model_len, self.vocab_size, capacity)
        self.steps = 0
        self._faults = fault_injector(config.model.fault_injection)
        self.async_scheduling = _async_scheduling(config, self.runner)
        #: the launched step whose tokens are not collected yet (async scheduling)
        self._in_flight: tuple[SchedulerOutput, LaunchedWork] | None = None
        self.load_seconds = time.perf_counter() - t0
        if self.async_scheduling:
            logger.info("async scheduling: on (the next step is scheduled while one runs)")

    # ---- intake --------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise a ``RequestRejected`` subclass if the request can never be served."""
        check_request(request, self.limits)

    def add_request(self, request: Request) -> None:
        self.validate(request)
        if request.request_id in self.scheduler.requests:
            raise DuplicateRequestId(f"request id {request.request_id!r} is already in flight")
        self.scheduler.add_request(request)

    def abort(
        self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT
    ) -> list[EngineCoreOutput]:
        return self.scheduler.abort(request_ids, reason)

    # ---- the loop ------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One step. An exception raised here is a failure of the step itself (a
        device error, a bug the whole batch hits): the caller marks the engine dead.
        What one request's own inputs break (its sampling setup in the runner, its
        stop checks in the scheduler) ends that request alone, with an ERROR output
        carrying the message, and the step goes on without it."""
        if self.asleep:
            return []  # requests wait until wake
        if self._faults is not None:
            self._inject_step_fault()
        if self.async_scheduling:
            return self._step_async()
        sched = self.scheduler.schedule()
        launched = self.runner.launch(sched)
        failed = self.scheduler.fail(launched.failed) if launched.failed else []
        result = self.runner.collect(launched)
        if sched.is_empty:
            return []
        self.steps += 1
        return failed + self.scheduler.update(sched, result)

    def _step_async(self) -> list[EngineCoreOutput]:
        """Launch the next step, then finish the one in flight: returns that one's
        outputs (the first call returns none). Requests whose setup failed in the
        launch end before anything schedules them again."""
        prev = self._in_flight
        sched = self.scheduler.schedule()
        launched = self.runner.launch(sched, prev[1] if prev is not None else None)
        failed = self.scheduler.fail(launched.failed) if launched.failed else []
        outputs = self._finish_in_flight()  # step n, while step n+1 runs
        self._in_flight = None if sched.is_empty else (sched, launched)
        if not sched.is_empty:
            self.steps += 1
        return failed + outputs

    def _inject_step_fault(self) -> None:
        """Fault injection's ``step`` stage: the step itself fails, as on a device error."""
        faults = self._faults
        for request in self.scheduler.requests.values():
            if faults is not None:
                faults.check(STEP, request.request_id, len(request.output_token_ids))

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        """Wait for the step in flight, if any, and return its outputs."""
        if self._in_flight is None:
            return []
        sched, launched = self._in_flight
        self._in_flight = None
        return self.scheduler.update(sched, self.runner.collect(launched))

    def has_unfinished(self) -> bool:
        """Requests in flight, or a launched step whose tokens are not collected."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=kv.usage(),
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            prefix_queries=kv.stats.queries,
            prefix_hits=kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            steps=self.steps,
            prompt_tokens_total=self.scheduler.num_prompt_tokens,
            generation_tokens_total=self.scheduler.num_generation_tokens,
            asleep=self.asleep,
            kv_sizing=self.runner.kv_sizing,
        )

    def info(self) -> EngineInfo:
        """What a client needs to know once the model is loaded."""
        loaded = self.runner.loaded
        return EngineInfo(
            model_dir=str(self.model_dir),
            eos_token_ids=self.eos_token_ids,
            limits=self.limits,
            load_bytes=loaded.num_bytes,
            load_seconds=loaded.load_seconds,
        )

    # ---- sleep / wake --------------------------------------------------------------
    @property
    def asleep(self) -> bool:
        return self.runner.asleep

    def sleep(self) -> float:
        """Move the weights to host memory and free the KV cache; returns seconds.
        Only when idle: the caller drains or aborts requests first."""
        if not self.scheduler.has_unfinished():
            self._finish_in_flight()  # a step of requests aborted since it launched
        if self.has_unfinished():
            raise EngineBusy(
                f"cannot sleep with {len(self.scheduler.requests)} requests in flight; "
                "drain or abort them first"
            )
        seconds = self.runner.sleep()
        self.kv.reset_prefix_cache()  # the cached blocks' contents are gone
        return seconds

    def wake(self) -> float:
        """Undo :meth:`sleep`; returns seconds."""
        return self.runner.wake()
