"""Requests, sampling parameters and outputs: the objects handed between components.

``SamplingParams`` and ``RequestOutput`` are what users see; ``Request`` is the
engine's own mutable record of one sequence and never leaves the engine core.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass

from lmfleet.errors import InvalidSamplingParams


class FinishReason(enum.StrEnum):
    """Why a sequence ended. Values match the OpenAI API where one exists."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"  # cancelled by the client, or drained past its grace period
    #: the engine failed while handling this request alone (``EngineCoreOutput.error``
    #: says why); the async engine raises ``RequestFailed`` instead of reporting it
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


#: ``seed`` is a signed 64-bit integer, what ``torch.Generator.manual_seed`` accepts
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated on construction.

    ``temperature == 0`` is greedy decoding. ``top_k <= 0`` and ``top_p == 1`` turn
    those filters off. ``seed`` makes a request's samples independent of whatever
    else is in the batch; it is a signed 64-bit integer.
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidSamplingParams:
            return InvalidSamplingParams(f"{param} {msg}", param=param)

        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(name, f"must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise bad(name, f"must be finite, got {value}")
            return float(value)

        def integer(name: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, f"must be an integer, got {type(value).__name__}")
            return value

        if self.max_tokens is not None and integer("max_tokens", self.max_tokens) < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if integer("min_tokens", self.min_tokens) < 0:
            raise bad("min_tokens", f"must be at least 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                "min_tokens",
                f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        if number("temperature", self.temperature) < 0:
            raise bad("temperature", f"must be at least 0, got {self.temperature}")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        integer("top_k", self.top_k)
        if not 0 <= number("min_p", self.min_p) <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise bad(
                "repetition_penalty", f"must be greater than 0, got {self.repetition_penalty}"
            )
        if not -2 <= number("presence_penalty", self.presence_penalty) <= 2:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= number("frequency_penalty", self.frequency_penalty) <= 2:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and not SEED_MIN <= integer("seed", self.seed) <= SEED_MAX:
            raise bad(
                "seed", f"must be a signed 64-bit integer in [-2**63, 2**63 - 1], got {self.seed}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", "must be a list of non-empty strings")
        for t in self.stop_token_ids:
            if integer("stop_token_ids", t) < 0:
                raise bad("stop_token_ids", f"must be non-negative, got {t}")
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= 20:
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (repetition, presence or
        frequency penalty)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True, slots=True)
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The log-probability of the sampled token and the top alternatives."""

    sampled: Logprob
    top: tuple[Logprob, ...]


class Request:
    """The engine's record of one sequence.

    One accounting rule drives scheduling: ``num_computed_tokens`` catches up to
    ``num_tokens`` (prompt + output) plus ``num_pending_tokens`` (sampled by a step
    still running). Prefill, chunked prefill, prefix-cache hits, recompute after
    preemption and async scheduling all follow from it. The scheduler advances
    ``num_computed_tokens`` when it schedules a step.
    """

    __slots__ = (
        "arrival_time",
        "block_hashes",
        "eos_token_ids",
        "finish_reason",
        "first_scheduled_time",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_pending_tokens",
        "num_preemptions",
        "output_token_ids",
        "priority",
        "prompt_token_ids",
        "request_id",
        "sampling_params",
        "status",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        #: tokens that launched steps sample but the host has not seen yet: with
        #: async scheduling one between steps (two while the next step is scheduled
        #: before the previous one is collected); 0 between synchronous steps
        self.num_pending_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first schedule; -1 = not yet
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.first_scheduled_time: float | None = None
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled lazily

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Token ids ``start:end`` of the prompt followed by the outputs, without
        building the whole list (:attr:`all_token_ids`)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"{self.status.value})"
        )


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (``time.monotonic``) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for one request.

    With ``delta=True`` (the async engine's stream) ``text``, ``token_ids`` and
    ``logprobs`` hold only what is new since the previous output; otherwise (offline
    ``LLM.generate``) they hold everything generated. One request is one sequence:
    the server fans ``n > 1`` out into several requests.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    delta: bool = False
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that matched
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    #: why the request failed, with ``finish_reason`` ERROR (offline ``LLM`` only: the
    #: async engine raises ``RequestFailed`` instead)
    error: str | None = None
