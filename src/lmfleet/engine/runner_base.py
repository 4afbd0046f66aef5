"""What the engine core needs from a runner: the :class:`Runner` protocol, and the
plain types it hands back. Two runners implement it, the model runner
(``engine/runner.py``, torch) and the simulated accelerator (``engine/sim``); the
core never asks which one it has. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from lmfleet.engine.outputs import RunnerOutput, SchedulerOutput
from lmfleet.engine.stats import KVSizing


@dataclass(slots=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


class RunnerArch(Protocol):
    """The few architecture facts the core reads."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...

    @property
    def eos_token_id(self) -> Sequence[int]: ...


class LoadFacts(Protocol):
    """How the weights loaded."""

    @property
    def num_bytes(self) -> int: ...

    @property
    def load_seconds(self) -> float: ...


class LaunchedWork(Protocol):
    """A step queued on the device (or the simulated one)."""

    #: requests whose own setup failed at launch (request id -> error): the core
    #: ends them alone
    @property
    def failed(self) -> dict[str, str]: ...


StepT = TypeVar("StepT", bound=LaunchedWork)


class Runner(Protocol[StepT]):
    """Runs the steps the scheduler plans. ``launch`` queues one without waiting for
    its tokens (``prev`` is the step still running, whose sampled tokens feed this
    one's in-flight inputs); ``collect`` waits for them."""

    model_dir: str
    asleep: bool
    #: how a profiled KV budget was derived (None: not profiled)
    kv_sizing: KVSizing | None

    @property
    def arch(self) -> RunnerArch: ...

    @property
    def loaded(self) -> LoadFacts: ...

    @property
    def prefers_async_scheduling(self) -> bool:
        """Whether overlapping one step's host work with another's device work pays
        (the default of ``SchedulerConfig.async_scheduling``)."""
        ...

    def bind_thread(self) -> None:
        """Make the calling thread ready to run steps (the model may have loaded on
        another thread)."""
        ...

    def plan_kv_cache(self) -> KVCacheLayout: ...

    def allocate_kv_cache(self, layout: KVCacheLayout) -> None: ...

    def launch(self, sched: SchedulerOutput, prev: StepT | None = None) -> StepT: ...

    def collect(self, step: StepT) -> RunnerOutput: ...

    def execute(self, sched: SchedulerOutput) -> RunnerOutput: ...

    def sleep(self) -> float: ...

    def wake(self) -> float: ...
