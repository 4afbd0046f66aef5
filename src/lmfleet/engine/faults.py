"""Fault injection: make one chosen request fail on purpose, to test isolation.

Off unless the operator opts in (``ModelConfig.fault_injection``, ``lmfleet serve
--fault-injection``): a normal deployment never looks at request ids here. When on,
a request whose id contains ``lmfleet-fault-STAGE`` (optionally followed by
``-after-N``) raises :class:`InjectedFault` at that stage once it has ``N`` output
tokens (default 0, i.e. at once):

- ``sample``: in the runner's per-request sampling setup (the real runner and the
  simulated one), where a bad seed used to raise; the request fails alone;
- ``output``: in the output processor (detokenization and stop strings), outside
  the core; the request fails alone;
- ``step``: in the engine step itself, as a device error would; the engine dies.

Over HTTP the id is the body's ``request_id`` (the engine's ids add ``-INDEX``), e.g.
``{"request_id": "lmfleet-fault-sample-after-3", ...}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: where a fault can be injected
STAGES = ("sample", "output", "step")
SAMPLE, OUTPUT, STEP = STAGES

_PATTERN = re.compile(r"lmfleet-fault-(sample|output|step)(?:-after-(\d+))?")


class InjectedFault(RuntimeError):
    """Raised on purpose by fault injection; never raised unless the operator
    enabled it."""


@dataclass(frozen=True, slots=True)
class Fault:
    stage: str
    after_tokens: int = 0


def parse_fault(request_id: str) -> Fault | None:
    """The fault a request id asks for, if any."""
    match = _PATTERN.search(request_id)
    if match is None:
        return None
    return Fault(match.group(1), int(match.group(2) or 0))


def fault_request_id(stage: str, after_tokens: int = 0, suffix: str = "") -> str:
    """A request id that asks for a fault at ``stage`` after ``after_tokens`` tokens."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    after = f"-after-{after_tokens}" if after_tokens else ""
    return f"lmfleet-fault-{stage}{after}{suffix}"


class FaultInjector:
    """Raises :class:`InjectedFault` where a request's id asks for it. Built only when
    fault injection is enabled; callers hold ``None`` otherwise, so a normal engine
    pays one ``is None`` test per request and step."""

    __slots__ = ()

    def check(self, stage: str, request_id: str, num_output_tokens: int) -> None:
        fault = parse_fault(request_id)
        if fault is not None and fault.stage == stage and num_output_tokens >= fault.after_tokens:
            raise InjectedFault(
                f"fault injected into request {request_id!r} at stage {stage!r} "
                f"after {num_output_tokens} output tokens"
            )


def fault_injector(enabled: bool) -> FaultInjector | None:
    return FaultInjector() if enabled else None
