"""``EngineClient``: the one narrow interface the server uses to reach an engine.

Generate, abort, stats, sleep, wake, health and shutdown; plus the tokenizer and the
facts the engine reported once loaded (:class:`~lmfleet.engine.stats.EngineInfo`).
Nothing here imports the engine core, the runner or torch, so the server's modules
can depend on this and on the plain data types (``engine/request.py``,
``engine/stats.py``) alone. :func:`connect_engine` builds the implementation, the
async engine, with its core in a background thread or in its own process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lmfleet.engine.config import EngineConfig
from lmfleet.engine.request import FinishReason, RequestOutput, SamplingParams
from lmfleet.engine.stats import EngineInfo, EngineStats

if TYPE_CHECKING:
    from lmfleet.engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """Whether the engine can make progress: ``dead`` once a step failed or its core
    process ended (not recoverable: the process should be replaced)."""

    started: bool
    dead: bool
    error: str | None = None


class EngineClient(Protocol):
    """What the server may ask of an engine; callbacks and streams run on the event
    loop that called :meth:`start`."""

    #: called once on the event loop when the engine dies
    on_dead: Callable[[BaseException], None] | None

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    @property
    def info(self) -> EngineInfo | None:
        """What the engine reported once loaded (limits, load facts); None before."""
        ...

    async def start(self) -> None:
        """Load the model and start the engine; a load error is raised here."""
        ...

    def encode(self, prompt: str | Sequence[int]) -> list[int]: ...

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs as deltas. Raises ``RequestRejected`` before
        the first output, ``RequestFailed`` if the engine failed on this request
        alone, ``EngineDead`` if the engine died."""
        ...

    def abort(self, request_id: str) -> None: ...

    def abort_all(self, reason: FinishReason = FinishReason.ABORT) -> None: ...

    def stats(self) -> EngineStats | None: ...

    async def sleep(self) -> float:
        """Weights to host memory, KV cache freed (``EngineBusy`` unless idle); seconds."""
        ...

    async def wake(self) -> float: ...

    def health(self) -> EngineHealth: ...

    async def shutdown(self) -> None: ...


def connect_engine(
    config: EngineConfig, *, progress: bool = True, engine_process: bool = False
) -> EngineClient:
    """The engine for ``config``, not started yet: its core in a background thread,
    or in its own process with ``engine_process``."""
    from lmfleet.engine.async_engine import AsyncEngine

    return AsyncEngine(config, progress=progress, engine_process=engine_process)
