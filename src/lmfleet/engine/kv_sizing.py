"""Sizing the KV cache on an accelerator from measured memory.

After the weights are loaded the runner runs one dummy forward at the full token
budget; the KV cache gets what is left of ``gpu_memory_utilization`` once the
weights, that forward's activation peak, a reserve and memory outside torch are
taken out. The arithmetic is a pure function; the device is read through
:class:`MemoryProbe` so that CPU tests can inject numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from lmfleet.engine.stats import KVSizing, human_bytes

__all__ = [
    "CudaMemoryProbe",
    "KVSizing",
    "MemoryProbe",
    "human_bytes",
    "kv_budget_bytes",
]


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
