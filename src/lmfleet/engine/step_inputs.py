"""A step's inputs, packed for one host-to-device copy.

The scheduler's output becomes token ids, positions, slot mapping, query starts,
sequence lengths, sample rows and the block table, all written into one int64
staging buffer (pinned on CUDA) with numpy and moved to the device in a single
non-blocking copy; the model reads views of it. One Python loop over requests
remains (:meth:`StepPlan.gather`): their token and block lists live in Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.outputs import SchedulerOutput

logger = logging.getLogger(__name__)


def _aligned(offset: int) -> int:
    """``offset`` rounded up to 16 bytes (two int64 slots), so every input starts where
    the kernels' vectorised loads and Triton's pointer specialisation expect."""
    return offset + (offset & 1)


@dataclass(frozen=True, slots=True)
class PackLayout:
    """Where each step input sits in the int64 staging buffer. The block table is
    int32 (what the attention kernels read), two entries per int64 slot."""

    num_tokens: int
    num_seqs: int
    num_samples: int
    width: int  # blocks per block-table row
    #: input tokens still in flight, gathered on the device from the previous step's
    #: sampled tokens (async scheduling)
    num_fills: int = 0

    def _after(self, region: slice, length: int) -> slice:
        start = _aligned(region.stop)
        return slice(start, start + length)

    @property
    def ids(self) -> slice:
        return slice(0, self.num_tokens)

    @property
    def positions(self) -> slice:
        return self._after(self.ids, self.num_tokens)

    @property
    def slots(self) -> slice:
        return self._after(self.positions, self.num_tokens)

    @property
    def query_start_loc(self) -> slice:
        return self._after(self.slots, self.num_seqs + 1)

    @property
    def seq_lens(self) -> slice:
        return self._after(self.query_start_loc, self.num_seqs)

    @property
    def table_entries(self) -> int:
        return self.num_seqs * self.width

    @property
    def table(self) -> slice:
        return self._after(self.seq_lens, (self.table_entries + 1) // 2)

    @property
    def sample_rows(self) -> slice:
        # last, so that every other input's place depends only on the token count,
        # the sequence count and the table width: a captured CUDA graph reads them
        # at fixed addresses while the number of sampled rows varies
        return self._after(self.table, self.num_samples)

    @property
    def fills(self) -> slice:
        """The in-flight tokens' rows in :attr:`ids`, then their rows in the previous
        step's sampled tokens."""
        return self._after(self.sample_rows, 2 * self.num_fills)

    @property
    def size(self) -> int:
        return self.fills.stop if self.num_fills else self.sample_rows.stop

    def metadata(
        self,
        buf: torch.Tensor,
        query_start_loc_cpu: list[int],
        seq_lens_cpu: list[int],
        *,
        block_size: int,
        max_query_len: int,
        max_seq_len: int,
    ) -> AttentionMetadata:
        """The attention metadata of a step packed into ``buf`` (int64, this layout),
        as views of it, with the host-side lists given."""
        tables = buf[self.table].view(torch.int32)[: self.table_entries]
        return AttentionMetadata(
            slot_mapping=buf[self.slots],
            query_start_loc=buf[self.query_start_loc],
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=buf[self.seq_lens],
            seq_lens_cpu=seq_lens_cpu,
            block_tables=tables.view(self.num_seqs, self.width),
            block_size=block_size,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )


def pack_capacity(max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> int:
    """int64 slots the largest step can need (every sequence samples and takes a
    token in flight)."""
    return PackLayout(max_tokens, max_seqs, max_seqs, max_blocks_per_seq, max_seqs).size


class StagingBuffer:
    """Reused int64 host buffers (pinned on CUDA) and one device twin, allocated once:
    a step's inputs are written on the host side and cross to the device in a single
    asynchronous copy instead of one synchronous copy per tensor. On CPU the host
    side is the device side and nothing is copied.

    On CUDA there are two host buffers, used in turn: with async scheduling the next
    step is packed while the copy out of the previous one may still wait behind a
    running forward, and writing into the other buffer does not wait for it. (The
    device side needs no twin: copies into it are ordered on the stream after every
    kernel that read the previous contents.)
    """

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        cuda = device.type == "cuda"
        turns = 2 if cuda else 1
        self._events = [torch.cuda.Event() if cuda else None for _ in range(turns)]
        self._pending = [False] * turns
        self._hosts: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * turns
        self._host_nps: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * turns
        self._turn = 0
        self.dev = torch.empty(0, dtype=torch.int64)
        for i in range(turns):
            self._grow_host(i, capacity)
        self._grow_dev(capacity)

    @property
    def capacity(self) -> int:
        return self.host.numel()

    @property
    def host(self) -> torch.Tensor:
        """The host buffer the current step is packed into."""
        return self._hosts[self._turn]

    def _grow_host(self, i: int, capacity: int) -> None:
        pin = self.device.type == "cuda"
        self._hosts[i] = torch.empty(capacity, dtype=torch.int64, pin_memory=pin)
        self._host_nps[i] = self._hosts[i].numpy()
        if self.device.type == "cpu":
            self.dev = self._hosts[i]

    def _grow_dev(self, capacity: int) -> None:
        if self.device.type != "cpu" and self.dev.numel() < capacity:
            self.dev = torch.empty(capacity, dtype=torch.int64, device=self.device)

    def host_view(self, n: int) -> np.ndarray:
        """The first ``n`` slots of the next host buffer, safe to overwrite: the copy
        out of it two steps ago has finished (it is waited for if not)."""
        self._turn = (self._turn + 1) % len(self._hosts)
        i = self._turn
        event = self._events[i]
        if self._pending[i] and event is not None:
            event.synchronize()
            self._pending[i] = False
        if n > self._hosts[i].numel():
            size = max(n, 2 * self._hosts[i].numel())
            logger.debug("staging buffer grows from %d to %d slots", self._hosts[i].numel(), size)
            self._grow_host(i, size)
            self._grow_dev(size)
        return self._host_nps[i][:n]

    def to_device(self, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``n`` slots of the buffer :meth:`host_view` gave, on the device,
        queued as one non-blocking copy: into this buffer's device side, or into
        ``into`` (int64, at least ``n`` slots: a CUDA graph's fixed input buffer)."""
        host = self._hosts[self._turn]
        if into is None and self.dev is host:
            return host[:n]
        dst = (self.dev if into is None else into)[:n]
        dst.copy_(host[:n], non_blocking=True)
        event = self._events[self._turn]
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))
            self._pending[self._turn] = True
        return dst


@dataclass(slots=True)
class StepInputs:
    """One step's device tensors: views into the staging buffer, valid until the
    next step is prepared."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    #: None when a decode graph runs the step: it reads its own metadata views
    meta: AttentionMetadata | None
    sample_rows: torch.Tensor  # (S,) int64: rows of the hidden states to sample from
    #: the decode graph's batch size when a CUDA graph (or its eager twin) runs the
    #: step; the tensors above are then views of that graph's padded input buffer
    graph_size: int | None = None


@dataclass(slots=True)
class StepPlan:
    """A step's inputs gathered from the requests, before they are packed."""

    tokens: list[int]
    block_ids: list[int]  # every sequence's block list, concatenated
    start: np.ndarray  # (B,) int64: tokens computed before this step
    count: np.ndarray  # (B,) int64: new tokens this step
    num_blocks: np.ndarray  # (B,) int64: length of each block list
    samples: np.ndarray  # (B,) bool
    #: token rows whose id is still in flight (placeholders in ``tokens``)...
    fill_rows: list[int] = field(default_factory=list)
    #: ...and the requests whose previous step samples them
    fill_requests: list[str] = field(default_factory=list)

    @classmethod
    def gather(cls, sched: SchedulerOutput) -> StepPlan:
        """The one loop over requests: token ids and block ids live in per-request
        Python lists; everything else is derived with numpy in :meth:`write`."""
        tokens: list[int] = []
        block_ids: list[int] = []
        starts, counts, num_blocks, samples = [], [], [], []
        fill_rows: list[int] = []
        fill_requests: list[str] = []
        for item in sched.scheduled:
            start = item.start
            r = item.request
            tokens += r.token_ids_between(start, start + item.num_new_tokens)
            if item.input_in_flight:  # its last input is the previous step's sample
                fill_rows.append(len(tokens))
                fill_requests.append(r.request_id)
                tokens.append(0)
            block_ids += item.block_ids
            starts.append(start)
            counts.append(item.num_new_tokens)
            num_blocks.append(len(item.block_ids))
            samples.append(item.samples)
        return cls(
            tokens,
            block_ids,
            np.array(starts, dtype=np.int64),
            np.array(counts, dtype=np.int64),
            np.array(num_blocks, dtype=np.int64),
            np.array(samples, dtype=bool),
            fill_rows,
            fill_requests,
        )

    def layout(self) -> PackLayout:
        num_samples = int(self.samples.sum())
        return PackLayout(
            len(self.tokens),
            len(self.count),
            num_samples,
            int(self.num_blocks.max()),
            len(self.fill_rows),
        )

    def write(
        self, buf: np.ndarray, lay: PackLayout, bs: int, fill_src: np.ndarray | None = None
    ) -> tuple[list[int], list[int]]:
        """Fill ``buf`` (int64, ``lay.size``) with every input; returns the query start
        offsets and sequence lengths of the real sequences as lists for the host side
        of the metadata. ``fill_src`` gives, for each in-flight token, its row in the
        previous step's sampled tokens.

        ``lay`` may be larger than :meth:`layout` (a CUDA graph's fixed shape): the
        rows past the real ones are padding sequences of one token each, with token
        id 0 at position 0, slot -1 (the KV write skips it), context length 0 (the
        attention reads nothing) and an all-zero block-table row; table rows are
        zero past each sequence's blocks.
        """
        num_seqs, num_tokens = len(self.count), len(self.tokens)
        pad = lay.num_seqs - num_seqs
        if pad < 0 or lay.num_tokens - num_tokens != pad or lay.width < self.num_blocks.max():
            raise ValueError(
                f"layout {lay} cannot hold {num_seqs} sequences, {num_tokens} tokens and "
                f"{int(self.num_blocks.max())} blocks per sequence (padding sequences hold "
                "one token each)"
            )
        qsl = buf[lay.query_start_loc]  # (Bp + 1,)
        qsl[0] = 0
        np.cumsum(self.count, out=qsl[1 : num_seqs + 1])
        qsl[num_seqs + 1 :] = num_tokens + np.arange(1, pad + 1)
        seq_lens = buf[lay.seq_lens]  # (Bp,)
        np.add(self.start, self.count, out=seq_lens[:num_seqs])
        seq_lens[num_seqs:] = 0
        ids = buf[lay.ids]  # (Tp,)
        ids[:num_tokens] = self.tokens
        ids[num_tokens:] = 0
        # token t of sequence i sits at position start_i + t - qsl_i
        positions = buf[lay.positions]  # (Tp,)
        offsets = np.repeat(self.start - qsl[:num_seqs], self.count)  # (T,)
        np.add(np.arange(num_tokens, dtype=np.int64), offsets, out=positions[:num_tokens])
        positions[num_tokens:] = 0
        table = buf[lay.table].view(np.int32)[: lay.table_entries].reshape(lay.num_seqs, -1)
        table[:] = 0
        widest = int(self.num_blocks.max())
        real = table[:num_seqs, :widest]  # (B, widest): a graph's table may be wider
        real[np.arange(widest) < self.num_blocks[:, None]] = self.block_ids  # row by row
        seq_of_token = np.repeat(np.arange(num_seqs), self.count)  # (T,)
        pos = positions[:num_tokens]
        block_of_token = real[seq_of_token, pos // bs].astype(np.int64)  # (T,)
        slots = buf[lay.slots]  # (Tp,)
        slots[:num_tokens] = block_of_token * bs + pos % bs
        slots[num_tokens:] = -1
        buf[lay.sample_rows] = qsl[1 : num_seqs + 1][self.samples] - 1
        if self.fill_rows:
            if fill_src is None or not len(fill_src) == len(self.fill_rows) == lay.num_fills:
                raise ValueError(
                    f"{len(self.fill_rows)} input tokens are in flight; the layout and "
                    "fill_src must account for each"
                )
            fills = buf[lay.fills]
            fills[: len(self.fill_rows)] = self.fill_rows
            fills[len(self.fill_rows) :] = fill_src
        return qsl[: num_seqs + 1].tolist(), seq_lens[:num_seqs].tolist()
