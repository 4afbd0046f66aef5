"""The engine core: one step is schedule → run → update.

``EngineCore`` is synchronous and single-threaded. The offline ``LLM`` drives it in a
loop; the async engine drives it from a background thread.

With async scheduling (on by default on CUDA) a step overlaps the host work around
it with the device work: ``step()`` schedules and launches step n+1 while step n
still runs, then waits for step n's tokens and turns them into outputs. Step n+1
takes n's tokens on the device. The host's scheduling, input packing, stop checks
and output building then hide behind the GPU's forward instead of adding to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.kv import KVCacheManager
from lmfleet.engine.kv_sizing import KVSizing
from lmfleet.engine.outputs import EngineCoreOutput, SchedulerOutput
from lmfleet.engine.request import FinishReason, Request
from lmfleet.engine.runner import LaunchedStep, ModelRunner
from lmfleet.engine.scheduler import Scheduler
from lmfleet.engine.sim import SIM_PREFIX, SimRunner
from lmfleet.engine.sim.runner import SimStep
from lmfleet.errors import (
    DuplicateRequestId,
    EngineBusy,
    InvalidSamplingParams,
    PromptTooLong,
    RequestRejected,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics and the replica's state endpoint."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    steps: int
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    asleep: bool = False
    kv_sizing: KVSizing | None = None  # how a profiled KV budget was derived

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def build_runner(config: EngineConfig, *, progress: bool = True) -> ModelRunner | SimRunner:
    """A real model runner, or the simulated accelerator for ``sim:PROFILE`` models."""
    if config.model.model.startswith(SIM_PREFIX):
        return SimRunner(config.model, config.cache, progress=progress)
    return ModelRunner(config.model, config.cache, config.scheduler, progress=progress)


def _async_scheduling(config: EngineConfig, runner: ModelRunner | SimRunner) -> bool:
    """The configured choice; by default on for a model on CUDA, where the host work
    of one step can overlap the device work of another."""
    choice = config.scheduler.async_scheduling
    if choice is not None:
        return choice
    return isinstance(runner, ModelRunner) and runner.device.type == "cuda"


class EngineCore:
    def __init__(self, config: EngineConfig, *, progress: bool = True) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.runner = build_runner(config, progress=progress)
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
        self.steps = 0
        self.async_scheduling = _async_scheduling(config, self.runner)
        #: the launched step whose tokens are not collected yet (async scheduling)
        self._in_flight: tuple[SchedulerOutput, LaunchedStep | SimStep] | None = None
        self.load_seconds = time.perf_counter() - t0
        if self.async_scheduling:
            logger.info("async scheduling: on (the next step is scheduled while one runs)")

    # ---- intake --------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise a ``RequestRejected`` subclass if the request can never be served."""
        n = request.num_prompt_tokens
        if n == 0:
            raise RequestRejected("the prompt is empty", param="prompt")
        if n >= self.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n} tokens. Shorten the prompt."
            )
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise InvalidSamplingParams(
                f"max_tokens is too large: the prompt has {n} tokens and this model's "
                f"maximum context length is {self.max_model_len}, so at most "
                f"{self.max_model_len - n} tokens can be generated",
                param="max_tokens",
            )
        capacity = self.kv.num_blocks * self.kv.block_size
        needed = n + (max_tokens if max_tokens is not None else 1)
        if needed > capacity:
            raise PromptTooLong(
                f"the request needs {needed} tokens of KV cache but the whole cache holds "
                f"{capacity}; shorten the prompt, lower max_tokens or raise the KV cache budget"
            )
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRejected(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                param="prompt",
            )

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
        if self.asleep:
            return []  # requests wait until wake
        if self.async_scheduling:
            return self._step_async()
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        if sched.is_empty:
            return []
        self.steps += 1
        return self.scheduler.update(sched, result)

    def _step_async(self) -> list[EngineCoreOutput]:
        """Launch the next step, then finish the one in flight: returns that one's
        outputs (the first call returns none)."""
        prev = self._in_flight
        sched = self.scheduler.schedule()
        launched = self.runner.launch(sched, prev[1] if prev is not None else None)
        outputs = self._finish_in_flight()  # step n, while step n+1 runs
        self._in_flight = None if sched.is_empty else (sched, launched)
        if not sched.is_empty:
            self.steps += 1
        return outputs

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
            kv_sizing=getattr(self.runner, "kv_sizing", None),
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
