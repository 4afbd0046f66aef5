"""Typed hand-off objects between the scheduler, the runner and the engine core.

Each hides its producer's internals: the runner sees which requests to run and how
many tokens of each, never the scheduler's queues; the scheduler sees sampled
tokens, never tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmfleet.engine.request import FinishReason, Request, TokenLogprobs
from lmfleet.errors import RequestFailed


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step. Built by the scheduler *before* it advances
    ``request.num_computed_tokens``: the step's start and whether it samples are
    taken from the request then, and stay valid while the step runs, whatever the
    scheduler does to the request afterwards (with async scheduling it schedules the
    next step before this one's token is known)."""

    request: Request
    #: tokens to compute this step, starting at :attr:`start`
    num_new_tokens: int
    #: the request's KV blocks, in order (covering the new tokens too)
    block_ids: list[int]
    #: tokens computed before this step
    start: int = field(init=False)
    #: True when this step reaches the end of the tokens the request has (or will
    #: have once its in-flight token is known), so the model's output at the last
    #: position is the next token
    samples: bool = field(init=False)
    #: the index in ``request.output_token_ids`` the token sampled this step gets
    output_index: int = field(init=False)
    #: True when this step's last input token is the one the previous step samples,
    #: not yet known on the host: the runner takes it from that step's device output
    input_in_flight: bool = field(init=False)

    def __post_init__(self) -> None:
        r = self.request
        self.start = r.num_computed_tokens
        end = self.start + self.num_new_tokens
        pending = r.num_pending_tokens
        self.samples = end == r.num_tokens + pending
        self.output_index = len(r.output_token_ids) + pending
        self.input_in_flight = pending > 0 and end > r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    #: requests that ended since the previous step (the runner drops their state)
    finished_request_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    #: request id -> the sampled token, for requests whose step sampled
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"``: how a request's failure is reported."""
    return f"{type(exc).__name__}: {exc}"


def request_failed(request_id: str, error: str) -> RequestFailed:
    """The exception a request's stream raises when the engine failed on it alone."""
    return RequestFailed(
        f"the engine failed while handling request {request_id} ({error}); only this "
        "request is affected"
    )


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request: new tokens and, maybe, its end."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that matched, if any
    num_cached_tokens: int = 0
    #: when the request was first scheduled (``time.monotonic``), on its first output
    first_scheduled_time: float | None = None
    #: why the request failed (with ``finish_reason`` ERROR): a message, so that it
    #: crosses the process boundary whatever the exception was
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
