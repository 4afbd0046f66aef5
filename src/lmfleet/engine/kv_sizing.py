"""Sizing the KV cache on an accelerator from measured memory.

After the weights are loaded the runner runs one dummy forward at the full token
budget; the KV cache gets what is left of ``gpu_memory_utilization`` once the
weights, that forward's activation peak, a reserve and memory outside torch are
taken out. The arithmetic is a pure function; the device is read through
:class:`MemoryProbe` so that CPU tests can inject numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


def kv_budget_bytes(
    total: int,
    utilization: float,
    weights: int,
    activation_peak: int,
    reserve: int,
    non_torch: int,
) -> int:
    """Bytes the KV cache may take: the engine's share of the device
    (``total × utilization``) less everything else that must fit in it. Never
    negative; a budget below two blocks is the caller's error to report."""
    return max(int(total * utilization) - weights - activation_peak - reserve - non_torch, 0)


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


class MemoryProbe(Protocol):
    """What KV sizing reads from the device; a seam so that CPU tests can inject
    made-up numbers while the real dummy forward still runs."""

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device, all processes included."""
        ...

    def memory_allocated(self) -> int:
        """Bytes this process's tensors occupy now."""
        ...

    def memory_reserved(self) -> int:
        """Bytes torch's caching allocator holds (allocated plus cached)."""
        ...

    def peak_allocated_during(self, fn: Callable[[], object]) -> int:
        """Run ``fn``; return the most bytes allocated at any point while it ran."""
        ...


class CudaMemoryProbe:
    """:class:`MemoryProbe` over ``torch.cuda``'s allocator statistics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def peak_allocated_during(self, fn: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()  # the forward's cached blocks go back for the KV cache
        return peak
