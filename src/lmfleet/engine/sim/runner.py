"""The simulated accelerator's runner: the real scheduler and KV cache manager feed
it, and instead of running a model it sleeps for the step time its profile gives and
emits deterministic tokens.

A generated token is a function of the seed, the position and the last
``CONTEXT_WINDOW`` tokens before it, so a stream is reproducible, and resubmitting a
prompt plus the tokens already generated continues it exactly (what a gateway does
to resume a stream on another replica).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmfleet.engine.config import SIM_PREFIX, CacheConfig, ModelConfig
from lmfleet.engine.faults import SAMPLE, fault_injector
from lmfleet.engine.outputs import (
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    describe_error,
)
from lmfleet.engine.request import Logprob, Request, TokenLogprobs
from lmfleet.engine.runner_base import KVCacheLayout
from lmfleet.engine.sim.profile import SimProfile, get_profile
from lmfleet.engine.sim.tokenizer import EOS_ID, FIRST_WORD_ID, IM_END_ID, write_sim_tokenizer
from lmfleet.engine.stats import KVSizing
from lmfleet.errors import ConfigError

logger = logging.getLogger(__name__)

CONTEXT_WINDOW = 8
_MASK = (1 << 61) - 1


def sim_home() -> Path:
    base = os.environ.get("LMFLEET_HOME", str(Path.home() / ".cache" / "lmfleet"))
    return Path(base) / "sim"


@dataclass(frozen=True, slots=True)
class SimArch:
    """The few architecture facts the engine core reads from a runner."""

    vocab_size: int
    max_position_embeddings: int
    eos_token_id: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SimLoad:
    num_bytes: int
    load_seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.num_bytes / self.load_seconds if self.load_seconds > 0 else 0.0


def sim_token(
    seed: int, position: int, context: tuple[int, ...], vocab_size: int, eos_p: float
) -> int:
    """The token the simulated model emits after ``context`` at ``position``."""
    h = hash((seed, position, context)) & _MASK
    if eos_p > 0 and (h % 1_000_003) < eos_p * 1_000_003:
        return EOS_ID
    return FIRST_WORD_ID + (h >> 20) % (vocab_size - FIRST_WORD_ID)


@dataclass(slots=True)
class SimStep:
    """A step queued on the simulated device: its output and when it is done
    (``time.perf_counter``), and the requests whose own setup failed (request id ->
    error), which the core ends alone."""

    output: RunnerOutput
    ready_at: float
    failed: dict[str, str] = field(default_factory=dict)


class SimRunner:
    def __init__(
        self, model_config: ModelConfig, cache_config: CacheConfig, *, progress: bool = True
    ):
        name = model_config.model[len(SIM_PREFIX) :]
        self.profile: SimProfile = get_profile(name)
        self.time_scale = model_config.sim_time_scale
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        p = self.profile
        self.model_dir = str(write_sim_tokenizer(sim_home() / p.name, p.vocab_size))
        self.arch = SimArch(p.vocab_size, p.max_model_len, (EOS_ID, IM_END_ID))
        self.asleep = False
        self.kv_sizing: KVSizing | None = None  # the simulator is never profiled
        self.faults = fault_injector(model_config.fault_injection)
        self.layout: KVCacheLayout | None = None
        self.seconds_simulated = 0.0
        self._busy_until = 0.0  # when the simulated device finishes its queued steps
        t0 = time.perf_counter()
        self._pause(p.load_s, "loading (simulated)" if progress else None)
        self.loaded = SimLoad(p.weight_bytes, time.perf_counter() - t0)

    # ---- the runner interface ------------------------------------------------------
    @property
    def prefers_async_scheduling(self) -> bool:
        return False  # its steps are sleeps: nothing to overlap

    def bind_thread(self) -> None:
        pass

    def plan_kv_cache(self) -> KVCacheLayout:
        cfg = self.cache_config
        per_block = self.profile.kv_bytes_per_token * self.block_size
        if cfg.num_blocks_override is not None:
            num_blocks = cfg.num_blocks_override
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // per_block
        else:
            num_blocks = self.profile.kv_capacity_tokens // self.block_size
        if num_blocks < 2:
            raise ConfigError(f"kv_cache_memory_bytes: buys {num_blocks} blocks; need at least 2")
        return KVCacheLayout(num_blocks, self.block_size, per_block)

    def allocate_kv_cache(self, layout: KVCacheLayout) -> None:
        self.layout = layout

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.collect(self.launch(sched))

    def launch(self, sched: SchedulerOutput, prev: SimStep | None = None) -> SimStep:
        """Queue a step on the simulated device: its tokens are known at once, but
        :meth:`collect` hands them over only when the device would have finished it,
        after every step queued before it (a device runs one step at a time)."""
        now = time.perf_counter()
        out = RunnerOutput()
        if sched.is_empty:
            return SimStep(out, now)
        prefill = decode = kv = 0
        failed: dict[str, str] = {}
        for item in sched.scheduled:
            r = item.request
            is_decode = item.num_new_tokens == 1 and item.start >= r.num_prompt_tokens
            if is_decode:
                decode += 1
            else:
                prefill += item.num_new_tokens
            kv += item.start + item.num_new_tokens
            if item.samples:
                outputs = r.output_token_ids
                if item.input_in_flight:  # an engine bug, not the request's: the step fails
                    if prev is None or r.request_id not in prev.output.sampled:
                        raise RuntimeError(
                            f"request {r.request_id!r} takes a token in flight, but the "
                            "previous step given did not sample it"
                        )
                    outputs = [*outputs, prev.output.sampled[r.request_id]]
                try:  # the request's own sampling: a failure ends it alone
                    self._sample(item, outputs, out)
                except Exception as exc:
                    logger.exception("request %s: sampling setup failed", r.request_id)
                    failed[r.request_id] = describe_error(exc)
        step = self.profile.step_seconds(prefill, decode, kv)
        self.seconds_simulated += step
        self._busy_until = max(now, self._busy_until) + step / self.time_scale
        return SimStep(out, self._busy_until, failed)

    def _sample(self, item: ScheduledRequest, outputs: list[int], out: RunnerOutput) -> None:
        """The request's next token after ``outputs`` (its outputs so far, one in flight
        included) into ``out``."""
        r = item.request
        if self.faults is not None:
            self.faults.check(SAMPLE, r.request_id, item.output_index)
        token = self._next_token(r, outputs)
        out.sampled[r.request_id] = token
        if r.sampling_params.logprobs is not None:
            out.logprobs[r.request_id] = _fake_logprobs(token, r.sampling_params.logprobs)

    def collect(self, step: SimStep) -> RunnerOutput:
        remaining = step.ready_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return step.output

    def sleep(self) -> float:
        t0 = time.perf_counter()
        self._pause(self.profile.sleep_s, None)
        self.asleep = True
        return time.perf_counter() - t0

    def wake(self) -> float:
        t0 = time.perf_counter()
        self._pause(self.profile.wake_s, None)
        self.asleep = False
        return time.perf_counter() - t0

    # ---- helpers -------------------------------------------------------------------
    def _next_token(self, r: Request, out: list[int]) -> int:
        """The token after the prompt and ``out`` (the outputs so far, including one
        still in flight)."""
        params = r.sampling_params
        n = r.num_prompt_tokens + len(out)
        if len(out) >= CONTEXT_WINDOW:
            context = tuple(out[-CONTEXT_WINDOW:])
        else:
            context = tuple(r.prompt_token_ids[len(out) - CONTEXT_WINDOW :]) + tuple(out)
        seed = params.seed or 0
        eos_p = 0.0 if params.ignore_eos else self.profile.eos_probability
        if len(out) < params.min_tokens:
            eos_p = 0.0
        token = sim_token(seed, n, context, self.profile.vocab_size, eos_p)
        while token in params.stop_token_ids and len(out) < params.min_tokens:
            token = FIRST_WORD_ID + (token + 1 - FIRST_WORD_ID) % (
                self.profile.vocab_size - FIRST_WORD_ID
            )
        return token

    def _pause(self, seconds: float, label: str | None) -> None:
        total = seconds / self.time_scale
        if label:
            logger.info(
                "%s: %.1f s (profile %s, time scale %g)",
                label,
                total,
                self.profile.name,
                self.time_scale,
            )
        end = time.perf_counter() + total
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(left, 1.0))


def _fake_logprobs(token: int, n: int) -> TokenLogprobs:
    """Deterministic stand-in logprobs: the sampled token ranks first."""
    sampled = Logprob(token, -0.05, 1)
    top = tuple(Logprob(token if i == 0 else FIRST_WORD_ID + i, -0.05 - i, i + 1) for i in range(n))
    return TokenLogprobs(sampled, top)
