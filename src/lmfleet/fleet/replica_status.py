"""What a replica reports about itself at ``GET /state``: one typed model shared by
the replica server (which builds it), the gateway's poller (which parses it) and the
test fakes (which stand in for a replica).

It knows nothing about the engine or the server: the gateway imports it without
either. The lifecycle states are spelled here as plain strings
(:data:`LifecycleState`), the values of the server's own lifecycle enum.

Parsing is lenient where it must be for rolling upgrades: keys it does not know are
kept (a newer replica may add some) and a missing key takes its default (an older
or a minimal replica may omit it); only ``state`` is required. The server always
sets every field, so its JSON carries every key below, in this order.
Admin answers (drain, sleep, wake) are this document plus their own keys.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: a replica's lifecycle state, as ``/state`` spells it
LifecycleState = Literal["starting", "ready", "draining", "asleep", "stopped"]
#: every value of :data:`LifecycleState`, in lifecycle order
LIFECYCLE_STATES: tuple[str, ...] = get_args(LifecycleState)


class ReplicaLimits(BaseModel):
    """The admission limits a replica runs with (``lmfleet serve`` flags)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    max_concurrent_requests: int | None = Field(default=None, ge=1)
    """Generation requests in flight before new ones get 429."""
    max_waiting_requests: int | None = Field(default=None, ge=0)
    """Requests the engine may queue before new ones get 429; None: no limit."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Sequences the engine runs in one batch."""
    drain_timeout_s: float | None = Field(default=None, ge=0)
    """Seconds a drain waits for what runs before it aborts the rest."""


class ReplicaStatusReport(BaseModel):
    """One replica's ``GET /state`` document."""

    model_config = ConfigDict(extra="allow", frozen=True)

    state: LifecycleState
    """The lifecycle state: only ``ready`` takes traffic."""
    ready: bool = True
    """READY and the engine alive. A replica that omits it is taken at its ``state``."""
    model: str = ""
    """The model's name (the first served name)."""
    served_model_names: list[str] = Field(default_factory=list)
    """Every name the replica answers to in a request's ``model``."""
    model_path: str = ""
    """Where the weights came from (a directory or a hub id)."""
    version: str = ""
    """The version label (``--version-label``) the fleet routes by."""
    seconds_in_state: float = Field(default=0.0, ge=0)
    """Seconds since the replica entered ``state``."""
    uptime_seconds: float = Field(default=0.0, ge=0)
    """Seconds since the replica process started serving."""
    running: int = Field(default=0, ge=0)
    """Sequences the engine is running now."""
    waiting: int = Field(default=0, ge=0)
    """Sequences queued in the engine (waiting for a batch slot or KV blocks)."""
    in_flight_requests: int = Field(default=0, ge=0)
    """Generation requests admitted and not yet answered."""
    in_flight_sequences: int = Field(default=0, ge=0)
    """Sequences of those requests (``n`` each)."""
    kv_cache_usage: float = Field(default=0.0, ge=0, le=1)
    """Fraction of the KV cache's blocks in use, 0 to 1."""
    kv_blocks_total: int = Field(default=0, ge=0)
    """KV cache blocks in all."""
    kv_blocks_free: int = Field(default=0, ge=0)
    """KV cache blocks free."""
    kv_blocks_in_use: int = Field(default=0, ge=0)
    """KV cache blocks in use (total minus free)."""
    prefix_cache_hit_rate: float = Field(default=0.0, ge=0, le=1)
    """Fraction of prefix-cache lookups that hit, 0 to 1."""
    num_preemptions: int = Field(default=0, ge=0)
    """Sequences preempted (out of KV blocks) since the start."""
    max_model_len: int | None = Field(default=None, ge=1)
    """Longest prompt plus output, in tokens; None until the model is loaded."""
    load_seconds: float | None = Field(default=None, ge=0)
    """Seconds reading the weights took; None until loaded."""
    load_bytes: int | None = Field(default=None, ge=0)
    """Bytes of weights read; None until loaded."""
    load_bytes_per_second: float | None = Field(default=None, ge=0)
    """``load_bytes / load_seconds``; None until loaded."""
    startup_seconds: float | None = Field(default=None, ge=0)
    """Seconds from process start to READY; None until READY once."""
    last_sleep_seconds: float | None = Field(default=None, ge=0)
    """Seconds the last ``/admin/sleep`` took; None before the first."""
    last_wake_seconds: float | None = Field(default=None, ge=0)
    """Seconds the last ``/admin/wake`` took; None before the first."""
    engine_dead: bool = False
    """The engine died: the replica answers 503 ``engine_dead`` until restarted."""
    error: str | None = None
    """Why loading failed (the replica stopped), else None."""
    limits: ReplicaLimits = Field(default_factory=ReplicaLimits)
    """The admission limits it runs with."""


def describe_errors(exc: ValidationError, *, limit: int = 3) -> str:
    """A ``ValidationError`` as one line naming each bad field:
    ``kv_cache_usage: Input should be a valid number (got 'lots')``."""
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f" (got {err['input']!r:.60})"
        parts.append(f"{where}: {err['msg']}{got}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
