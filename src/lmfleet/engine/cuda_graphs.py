"""CUDA graphs for decode steps.

A decode step of a small model is a few hundred tiny kernels; launched one by one
from Python they cost far more host time than the GPU needs to run them (about
40 ms per step for Qwen3-0.6B at batch 1 on an H200, eager). A CUDA graph records
the kernels of one forward once and replays them with a single launch.

A graph has fixed shapes and reads its inputs at fixed addresses, so:

- graphs are captured for a ladder of batch sizes (:func:`capture_sizes`); a decode
  step of ``B`` sequences replays the smallest graph of at least ``B`` rows, the rows
  past ``B`` being padding sequences that write no K/V and attend to nothing
  (:meth:`StepPlan.write` lays them out);
- every input (token ids, positions, slot mapping, query starts, sequence lengths,
  block table) lives in one int64 device buffer, :attr:`DecodeGraphs.inputs`, laid
  out by :class:`PackLayout` with a fixed block-table width: the runner packs a
  step on the host and moves it there in one copy, then replays;
- steps that do not fit (prefill chunks, more sequences than the largest graph,
  contexts longer than ``max_seq_len_to_capture``) run eagerly.

The graphs also bake in the KV cache's and the weights' addresses: they are dropped
when the runner sleeps and captured again when it wakes.

Only the forward up to the final norm is captured; the LM head runs eagerly over
the sampled rows, whose number varies.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.step_inputs import PackLayout, StepPlan

logger = logging.getLogger(__name__)

#: batch sizes with a graph: every size up to 8 that is a power of two, then steps
#: that keep the padding below about a quarter of the batch
_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
#: the largest batch captured; bigger decode steps run eagerly (they are GPU-bound)
MAX_CAPTURE_SIZE = _LADDER[-1]

#: ``forward(input_ids, positions, meta) -> hidden`` over the runner's KV caches
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def capture_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_SIZE) -> list[int]:
    """The batch sizes to capture: the ladder up to ``min(max_num_seqs, limit)``,
    which is always included."""
    top = min(max_num_seqs, limit)
    if top < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    return [b for b in _LADDER if b < top] + [top]


def pick_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``num_seqs`` rows, or None."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Decode forwards at fixed batch sizes over fixed input addresses.

    ``capture=True`` (CUDA) records one graph per size; ``capture=False`` runs the
    same padded, fixed-address forward eagerly, which is how the padding and the
    layout are tested on CPU.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        device: torch.device,
        sizes: list[int],
        width: int,
        block_size: int,
        capture: bool,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.forward = forward
        self.device = device
        self.sizes = sorted(sizes)
        #: block-table entries per row: contexts up to ``width * block_size`` tokens fit
        self.width = width
        self.block_size = block_size
        self.capture_enabled = capture
        top = self.sizes[-1]
        #: every graph's inputs, at the start of this buffer (largest layout)
        self.inputs = torch.zeros(self.layout(top, top, top).size, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        #: device memory the captures kept (the graphs' shared pool), bytes
        self.capture_bytes = 0

    @property
    def max_context(self) -> int:
        return self.width * self.block_size

    def layout(self, size: int, num_samples: int, num_fills: int = 0) -> PackLayout:
        """Where a ``size``-row decode step's inputs sit in :attr:`inputs`; all but
        the sampled rows and in-flight token fills (placed last) are the same for
        every step of that size."""
        return PackLayout(size, size, num_samples, self.width, num_fills)

    def size_for(self, plan: StepPlan) -> int | None:
        """The graph size that runs ``plan``, or None when it must run eagerly: not
        decode-only, too many sequences, or a block table wider than the graphs'."""
        num_seqs = len(plan.count)
        if num_seqs == 0 or len(plan.tokens) != num_seqs:
            return None  # some sequence brings more (or fewer) than one token
        if int(plan.num_blocks.max()) > self.width:
            return None
        return pick_size(num_seqs, self.sizes)

    def _views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and attention metadata of a ``size``-row step, as
        views of :attr:`inputs`. The host-side lists describe an all-padding batch:
        only the Triton backend, which reads none of them, runs under graphs."""
        lay = self.layout(size, 0)
        buf = self.inputs
        meta = lay.metadata(
            buf,
            list(range(size + 1)),
            [0] * size,
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=self.max_context,
        )
        return buf[lay.ids], buf[lay.positions], meta

    def _fill_padding(self, size: int) -> None:
        """Make the ``size``-row inputs an all-padding batch (warm-up and capture
        must neither write K/V nor read it)."""
        lay = self.layout(size, 0)
        buf = self.inputs
        buf[lay.ids].zero_()
        buf[lay.positions].zero_()
        buf[lay.slots].fill_(-1)
        buf[lay.query_start_loc].copy_(torch.arange(size + 1, device=self.device))
        buf[lay.seq_lens].zero_()
        buf[lay.table].zero_()

    def capture(self, progress: Callable[[int, int], None] | None = None) -> float:
        """Warm up and record every size, largest first so the smaller graphs reuse
        its memory pool; returns seconds taken. No-op without ``capture``."""
        if not self.capture_enabled:
            return 0.0
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        # torch.cuda.graph empties the allocator's cache before every capture: empty it
        # here too, and again at the end, so the difference is the graphs' own pool
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        for n, size in enumerate(reversed(self.sizes), 1):
            self._fill_padding(size)
            ids, positions, meta = self._views(size)
            # eager first: Triton compiles and cuBLAS picks its kernels outside capture
            self.forward(ids, positions, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call from another thread (the server's /metrics reads
            # free memory) must not invalidate the capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self.forward(ids, positions, meta)  # (size, hidden)
            self._graphs[size] = graph
            self._outputs[size] = out
            if progress is not None:
                progress(n, len(self.sizes))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager warm-ups' blocks; the graphs' pool stays
        self.capture_seconds = time.perf_counter() - t0
        self.capture_bytes = max(torch.cuda.memory_reserved(self.device) - reserved, 0)
        return self.capture_seconds

    def run(self, size: int) -> torch.Tensor:
        """The hidden states (size, hidden) of the step whose inputs were just copied
        into :attr:`inputs`; rows past the step's sequences are padding. With graphs
        the tensor is the graph's output buffer, overwritten by the next replay."""
        graph = self._graphs.get(size)
        if graph is None:
            if self.capture_enabled:
                raise RuntimeError(f"no CUDA graph was captured for batch size {size}")
            return self.forward(*self._views(size))
        graph.replay()
        return self._outputs[size]


__all__ = ["MAX_CAPTURE_SIZE", "DecodeGraphs", "capture_sizes", "pick_size"]
