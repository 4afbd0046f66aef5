"""One client request on its way through the gateway, and what passes between the
parts that serve it: the request pipeline (:mod:`lmfleet.gateway.proxy`), the stream
relay (:mod:`lmfleet.gateway.relay`) and shadow copies (:mod:`lmfleet.gateway.shadow`).

- :class:`Call`: the request as the gateway sees it, filled in as it goes;
- :class:`Reply`: a replica's answer with the lease on that replica (its in-flight
  count), closed once by whoever holds it;
- :class:`Sender`: what the relay and the shadow copies use of the pipeline;
- :func:`record`: a finished call's metrics, version stats and A/B samples.

No I/O happens here.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from lmfleet.gateway.auth import ClientKey
from lmfleet.gateway.errors import GatewayError
from lmfleet.gateway.lease import ReplicaLease
from lmfleet.gateway.policies.balance import RouteRequest
from lmfleet.gateway.registry import ModelEntry, ReplicaInfo, VersionEntry
from lmfleet.gateway.rollout import StepWindow
from lmfleet.gateway.state import GatewayState
from lmfleet.gateway.upstream import UpstreamResponse

VERSION_HEADER = "x-lmfleet-version"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(slots=True)
class Call:
    """One client request on its way through."""

    rid: str
    path: str
    chat: bool
    payload: dict[str, Any]
    model: ModelEntry
    version: VersionEntry
    stream: bool
    key: ClientKey
    t0: float
    route: RouteRequest
    priority: int = 0
    #: how the version was chosen: "split" (the weights), "pinned" (the header) or
    #: "shadow" (a copy); only split requests feed a rollout's window
    source: str = "split"
    #: the rollout window of the step this request started in, if it feeds one
    window: StepWindow | None = None
    #: perf_counter time by which a non-streaming answer must be complete
    deadline: float | None = None
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    replica: ReplicaInfo | None = None
    t_first: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: the response has begun (an error can no longer be sent as a status)
    responded: bool = False

    @property
    def labels(self) -> tuple[str, str]:
        return (self.version.model, self.version.name)


@dataclass(slots=True)
class Reply:
    """A replica's answer and the lease on that replica, held while the answer is
    relayed. ``resp``'s head has arrived; a non-streaming answer, and any error
    answer, is read whole into ``resp.content``. Whoever gets a Reply closes it
    (``with reply:``), which releases the lease and returns the connection;
    closing again does nothing."""

    lease: ReplicaLease
    resp: UpstreamResponse

    @property
    def replica(self) -> ReplicaInfo:
        return self.lease.replica

    def close(self) -> None:
        self.lease.release()
        self.resp.close()

    def __enter__(self) -> Reply:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()


class Sender(Protocol):
    """What the relay and the shadow copies use of the request pipeline
    (:class:`lmfleet.gateway.proxy.Proxy`)."""

    def pick(self, call: Call, version: VersionEntry) -> ReplicaInfo | None:
        """A replica of ``version`` that ``call`` has not tried, by the balancer."""
        ...

    async def try_on(self, call: Call, replica: ReplicaInfo, path: str, body: bytes) -> Reply:
        """One try on ``replica``; raises :class:`TryElsewhere` when another replica
        may try, or the :class:`GatewayError` the client gets."""
        ...

    async def forward(self, call: Call, version: VersionEntry) -> Reply:
        """Try replicas of ``version`` until one answers, retrying what is safe."""
        ...


class Passthrough(GatewayError):
    """A replica's own error answer, relayed as it came."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(status, "upstream error", headers=headers)
        self.raw = body

    def body_bytes(self) -> bytes:
        return self.raw


class TryElsewhere(Exception):
    """This try failed in a way that is safe to try on another replica; ``err`` is
    what the client gets if no other try succeeds."""

    def __init__(self, err: GatewayError) -> None:
        super().__init__(err.message)
        self.err = err


def account_json(state: GatewayState, call: Call, body: bytes) -> None:
    """Token counts and response id of a non-streaming answer's JSON body."""
    try:
        obj = json.loads(body)
    except ValueError:
        return
    if not isinstance(obj, dict):
        return
    usage = obj.get("usage")
    if isinstance(usage, dict):
        with contextlib.suppress(TypeError, ValueError):
            call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            call.completion_tokens = int(usage.get("completion_tokens") or 0)
    if isinstance(obj.get("id"), str):
        state.remember_response(obj["id"], *call.labels)


def record(state: GatewayState, call: Call, *, outcome: str, error: bool) -> None:
    """A finished call: metrics, version stats, the key's tokens, A/B samples."""
    m = state.metrics
    labels = call.labels
    now = time.perf_counter()
    e2e = now - call.t0
    ttft = call.t_first - call.t0 if call.t_first is not None else None
    tpot = None
    m.requests.labels(*labels, outcome).inc()
    if error:
        m.errors.labels(*labels, outcome).inc()
    else:
        m.e2e.labels(*labels).observe(e2e)
        if ttft is not None:
            m.ttft.labels(*labels).observe(ttft)
            if call.completion_tokens > 1:
                tpot = (e2e - ttft) / (call.completion_tokens - 1)
                m.tpot.labels(*labels).observe(tpot)
        elif not call.stream and call.completion_tokens > 0:
            # a unary answer shows no first token: per output token of the whole
            # answer (for the A/B samples and rollouts, not the TPOT histogram)
            tpot = e2e / call.completion_tokens
    if call.prompt_tokens:
        m.tokens.labels(*labels, "prompt").inc(call.prompt_tokens)
    if call.completion_tokens:
        m.tokens.labels(*labels, "completion").inc(call.completion_tokens)
    streamed = ttft is not None and not error  # what the TTFT/TPOT histograms observe
    state.version_stats.record_finish(
        *labels, ttft_s=ttft if streamed else None, tpot_s=tpot if streamed else None,
        output_tokens=call.completion_tokens, error=error,
    )  # fmt: skip
    call.key.record_tokens(call.prompt_tokens + call.completion_tokens)
    if outcome != "client_disconnect":
        sample = {"ttft": ttft, "tpot": tpot, "e2e": None if error else e2e, "error": error}
        state.version_samples(*labels).record(**sample)
        side = call.window.samples_for(call.version.name) if call.window else None
        if side is not None:
            side.record(**sample)
