"""Plain snapshots the engine reports: torch-free, so the server's metrics, its state
endpoint and anything else that reads them never import the engine's device code.

``EngineStats`` is the per-step snapshot; ``EngineInfo`` what the engine tells its
client once the model is loaded (limits, load facts); ``KVSizing`` how a profiled KV
budget was derived.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfleet.engine.limits import EngineLimits


@dataclass(frozen=True, slots=True)
class KVSizing:
    """The numbers behind a profiled KV budget, kept for logs, stats and benchmarks.

    ``weights_bytes`` is everything torch held once the model was loaded;
    ``activation_peak_bytes`` what a forward at the full token budget added on top;
    ``non_torch_bytes`` device memory outside torch's allocator (the CUDA context,
    libraries, other processes).
    """

    total_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int
    activation_peak_bytes: int
    reserve_bytes: int
    non_torch_bytes: int
    budget_bytes: int
    bytes_per_block: int
    num_blocks: int
    profile_tokens: int
    profile_seqs: int

    def describe(self) -> str:
        """One line with every term of the budget."""
        return (
            f"{human_bytes(self.total_bytes)} total x {self.gpu_memory_utilization:g} "
            f"- weights {human_bytes(self.weights_bytes)} "
            f"- activation peak {human_bytes(self.activation_peak_bytes)} "
            f"({self.profile_tokens} tokens in {self.profile_seqs} sequences) "
            f"- reserve {human_bytes(self.reserve_bytes)} "
            f"- non-torch {human_bytes(self.non_torch_bytes)} "
            f"= KV budget {human_bytes(self.budget_bytes)} "
            f"= {self.num_blocks} blocks of {human_bytes(self.bytes_per_block)}"
        )


def human_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


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


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a loaded engine tells its client once: where its tokenizer lives, its
    limits, and how the weights loaded."""

    model_dir: str
    eos_token_ids: frozenset[int]
    limits: EngineLimits
    load_bytes: int
    load_seconds: float

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len
