"""Turn the last-position logits of a batch into next tokens (and their logprobs).

The sampler knows nothing about scheduling or stopping: the runner hands over one
:class:`SamplingBatch` per step, with one row per sequence that samples this step,
and gets back one token per row.

Order of operations for each row:

1. **Logprobs** (rows with ``logprobs`` set) come from the model's *raw* logits,
   before blocking, penalties or temperature (vLLM's ``raw_logprobs``).
2. **Blocked tokens** (EOS and stop tokens while ``min_tokens`` is not yet reached)
   are set to ``-inf``.
3. **Repetition penalty** (Hugging Face semantics): for every token seen in the
   prompt or output, positive logits are divided by the penalty, negative ones
   multiplied.
4. **Presence and frequency penalties** (OpenAI semantics, output tokens only):
   ``logit -= presence * (count > 0) + frequency * count``.
5. **Greedy rows** (``temperature < 1e-5``) take the argmax and stop here.
6. Other rows: divide by the temperature, then **top-k**, **top-p** (the smallest
   set of tokens whose cumulative probability reaches ``top_p``; at least one),
   **min-p** (drop tokens with probability below ``min_p`` times the largest), and
   sample by exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` per token.

The noise of a row with its own generator (a seeded request) is drawn from that
generator alone, one ``(V,)`` draw per sampled token, so its tokens depend only on
its seed, its logits and how many tokens it has sampled before; never on the other
rows or its row index. Unseeded rows share the sampler's generator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmfleet.engine.request import Logprob, Request, SamplingParams, TokenLogprobs
from lmfleet.engine.step_inputs import StagingBuffer

#: temperatures below this are treated as greedy (dividing by them overflows)
GREEDY_EPS = 1e-5

#: int64 slots the sampler's staging buffer starts with; it grows when a batch needs more
_STAGING_SLOTS = 4096


@dataclass(slots=True)
class SamplingBatch:
    """What the runner hands the sampler for ``B`` rows; row ``i`` is logits row ``i``."""

    params: list[SamplingParams]
    #: a request's own generator when it has a seed; None uses the sampler's
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    #: token ids that must not be sampled at this step (ids >= V are ignored)
    blocked_token_ids: list[tuple[int, ...]]
    #: async scheduling: the previous step's sampled tokens, still on the device...
    pending_tokens: torch.Tensor | None = None
    #: ...and per row, where the row's newest output token sits there when the host
    #: does not know it yet (None: ``output_token_ids`` is complete). Penalties count it.
    pending_index: list[int | None] | None = None

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[Request],
        generators: Sequence[torch.Generator | None],
        output_indices: Sequence[int] | None = None,
        pending_tokens: torch.Tensor | None = None,
        pending_index: list[int | None] | None = None,
    ) -> SamplingBatch:
        """Build the batch for ``requests``; ``generators[i]`` belongs to ``requests[i]``.
        ``output_indices[i]`` is the output index of the token row ``i`` samples
        (default: the next one; more when earlier tokens are still in flight), and
        ``pending_tokens[pending_index[i]]`` the row's last output when it is in flight."""
        if len(generators) != len(requests):
            raise ValueError(
                f"need one generator (or None) per request: got {len(generators)} "
                f"for {len(requests)} requests"
            )
        if output_indices is None:
            output_indices = [len(r.output_token_ids) for r in requests]
        return cls(
            params=[r.sampling_params for r in requests],
            generators=list(generators),
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            blocked_token_ids=[
                blocked_token_ids(r, i) for r, i in zip(requests, output_indices, strict=True)
            ],
            pending_tokens=pending_tokens,
            pending_index=pending_index,
        )

    def __len__(self) -> int:
        return len(self.params)


def blocked_token_ids(request: Request, output_index: int | None = None) -> tuple[int, ...]:
    """The stop tokens (the EOS ids unless ``ignore_eos``, plus ``stop_token_ids``) while
    the token being sampled, output number ``output_index`` (default: the next one),
    comes before ``min_tokens``; otherwise none."""
    params = request.sampling_params
    if output_index is None:
        output_index = len(request.output_token_ids)
    if output_index >= params.min_tokens:
        return ()
    eos = () if params.ignore_eos else tuple(sorted(request.eos_token_ids))
    return eos + params.stop_token_ids


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    #: one entry per row; None where the request did not ask for logprobs
    logprobs: list[TokenLogprobs | None]


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS


def _argmax_only(batch: SamplingBatch) -> bool:
    return all(_is_greedy(p) and not p.has_penalties and p.logprobs is None for p in batch.params)


# ---- one host-to-device copy ---------------------------------------------------------


class _Pack:
    """Named regions of a call's int64 staging buffer, filled from host values.

    An int64 value takes one slot, a float32 value half of one; every region starts
    on an even slot (16 bytes). :meth:`send` writes them all and queues one copy.
    """

    def __init__(self) -> None:
        self.size = 0
        #: name -> (first slot, length, float32?, values)
        self._regions: dict[str, tuple[int, int, bool, Sequence | np.ndarray]] = {}

    def ints(self, name: str, values: Sequence[int] | np.ndarray) -> None:
        self._add(name, values, floats=False)

    def floats(self, name: str, values: Sequence[float]) -> None:
        self._add(name, values, floats=True)

    def _add(self, name: str, values: Sequence | np.ndarray, *, floats: bool) -> None:
        n = len(values)
        if n == 0:
            return  # an empty region is simply absent
        start = self.size + (self.size & 1)
        self._regions[name] = (start, n, floats, values)
        self.size = start + ((n + 1) // 2 if floats else n)

    def send(self, staging: StagingBuffer) -> dict[str, torch.Tensor]:
        """Write every region into ``staging``, move them in one non-blocking copy
        and return device views by name. Nothing is copied when the pack is empty."""
        if not self._regions:
            return {}
        host = staging.host_view(self.size)
        for start, n, floats, values in self._regions.values():
            if floats:
                host[start : start + (n + 1) // 2].view(np.float32)[:n] = values
            else:
                host[start : start + n] = values
        dev = staging.to_device(self.size)
        views: dict[str, torch.Tensor] = {}
        for name, (start, n, floats, _) in self._regions.items():
            if floats:
                views[name] = dev[start : start + (n + 1) // 2].view(torch.float32)[:n]
            else:
                views[name] = dev[start : start + n]
        return views


class _Fetch:
    """A queued device-to-host copy; :meth:`wait` is its one sync."""

    __slots__ = ("_event", "_host")

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self._host = host
        self._event = event

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class _ReadBack:
    """Device results to the host: one non-blocking copy into a reused pinned int64
    buffer and one wait on an event, the call's only sync. Two buffers are used in
    turn, so a step's results can be copied while the previous step's still wait to
    be read (async scheduling). On CPU the values are read in place."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else []
        self._hosts = [torch.empty(0, dtype=torch.int64)] * 2
        self._turn = 0

    def start(self, values: torch.Tensor) -> _Fetch:
        """Queue the copy of ``values`` (N,) int64; the fetched array stays valid until
        the second-next :meth:`start`."""
        if not self._events:
            return _Fetch(values, None)
        self._turn ^= 1
        i = self._turn
        n = values.numel()
        if n > self._hosts[i].numel():
            size = max(n, 2 * self._hosts[i].numel(), 1024)
            self._hosts[i] = torch.empty(size, dtype=torch.int64, pin_memory=True)
        host = self._hosts[i][:n]
        host.copy_(values, non_blocking=True)
        event = self._events[i]
        event.record(torch.cuda.current_stream(self.device))
        return _Fetch(host, event)


@dataclass(slots=True)
class PendingSample:
    """A sampling call whose tokens are still on the device: :attr:`token_ids` can feed
    the next step's inputs there; :meth:`result` waits for them on the host."""

    #: (B,) int64 on the logits' device
    token_ids: torch.Tensor
    _finish: Callable[[], SamplerOutput]
    _result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is None:
            self._result = self._finish()
        return self._result


# ---- host-side plan -------------------------------------------------------------------


def _stage_blocked(pack: _Pack, blocked: Sequence[Sequence[int]], vocab: int) -> None:
    """The blocked ``(row, col)`` pairs as one region: all rows, then all columns."""
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(blocked):
        for t in ids:
            if t < vocab:
                rows.append(i)
                cols.append(t)
    pack.ints("blocked", rows + cols)


def _flat_ids(seqs: Sequence[Sequence[int]], vocab: int) -> np.ndarray:
    """Where each token of each sequence lands in a flattened ``(R, V + 1)`` count
    matrix: ``r * (V + 1) + t``. Ids outside ``[0, V)`` go to the extra column."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
    tokens = np.where((tokens >= 0) & (tokens < vocab), tokens, vocab)
    return np.repeat(np.arange(len(seqs), dtype=np.int64) * (vocab + 1), lengths) + tokens


def _stage_penalties(pack: _Pack, batch: SamplingBatch, rows: list[int], vocab: int) -> None:
    params = [batch.params[i] for i in rows]
    if len(rows) < len(batch):
        pack.ints("penalty_rows", rows)
    pack.ints("output_ids", _flat_ids([batch.output_token_ids[i] for i in rows], vocab))
    pending = batch.pending_index
    if pending is not None:  # outputs still on the device are counted there
        dst = [j for j, i in enumerate(rows) if pending[i] is not None]
        pack.ints("pending_dst", dst)
        pack.ints("pending_src", [pending[rows[j]] for j in dst])  # type: ignore[misc]
    if any(p.repetition_penalty != 1.0 for p in params):
        pack.floats("repetition", [p.repetition_penalty for p in params])
        pack.ints("prompt_ids", _flat_ids([batch.prompt_token_ids[i] for i in rows], vocab))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        pack.floats("presence", [p.presence_penalty for p in params])
        pack.floats("frequency", [p.frequency_penalty for p in params])


def _stage_filters(pack: _Pack, params: list[SamplingParams], vocab: int) -> None:
    pack.floats("temperature", [p.temperature for p in params])
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        pack.ints("top_k", [p.top_k if 0 < p.top_k < vocab else vocab for p in params])
        pack.floats("top_p", [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        pack.floats("min_p", [p.min_p for p in params])


@dataclass(slots=True)
class _Plan:
    """Which rows take which steps (decided on the host from the Python params), and
    the pack of every per-row value those steps read on the device."""

    pack: _Pack
    lp_rows: list[int]  # rows that want logprobs
    penalty_rows: list[int]
    sample_rows: list[int]  # rows that are not greedy
    sample_generators: list[torch.Generator | None]  # one per sample row
    shared: list[int]  # positions among the sample rows that use the sampler's generator
    #: the previous step's sampled tokens (async scheduling), for penalties
    pending_tokens: torch.Tensor | None = None

    @classmethod
    def build(cls, batch: SamplingBatch, vocab: int) -> _Plan:
        pack = _Pack()
        n = len(batch)
        lp_rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        if len(lp_rows) < n:
            pack.ints("lp_rows", lp_rows)
        _stage_blocked(pack, batch.blocked_token_ids, vocab)
        penalty_rows = [i for i, p in enumerate(batch.params) if p.has_penalties]
        if penalty_rows:
            _stage_penalties(pack, batch, penalty_rows, vocab)
        sample_rows = [i for i, p in enumerate(batch.params) if not _is_greedy(p)]
        generators = [batch.generators[i] for i in sample_rows]
        shared = [j for j, g in enumerate(generators) if g is None]
        if sample_rows:
            _stage_filters(pack, [batch.params[i] for i in sample_rows], vocab)
            if len(sample_rows) < n:
                pack.ints("sample_rows", sample_rows)
            if len(shared) < len(sample_rows):
                pack.ints("shared_rows", shared)
        return cls(
            pack, lp_rows, penalty_rows, sample_rows, generators, shared, batch.pending_tokens
        )


def _rows(t: torch.Tensor, dev: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The rows of ``t`` staged under ``key``; all of ``t`` (not a copy) when absent."""
    index = dev.get(key)
    return t if index is None else t.index_select(0, index)


# ---- the sampler ----------------------------------------------------------------------


class Sampler:
    """Samples one token per row; see the module docstring for the order of steps."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        #: shared by every row without its own generator
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._staging: StagingBuffer | None = None
        self._readback: _ReadBack | None = None

    def _buffers(self, device: torch.device) -> tuple[StagingBuffer, _ReadBack]:
        """The reused staging and read-back buffers for ``device`` (the logits')."""
        if self._staging is None or self._staging.device != device:
            self._staging = StagingBuffer(device, _STAGING_SLOTS)
        if self._readback is None or self._readback.device != device:
            self._readback = _ReadBack(device)
        return self._staging, self._readback

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """``logits`` is ``(B, V)``, one row per batch row; it is not modified."""
        return self.sample(logits, batch).result()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
        """Queue the sampling of ``logits`` (B, V) and the copy of its results to the
        host without waiting for them."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(
                f"logits must be (B, V) with B = {len(batch)} rows, got {tuple(logits.shape)}"
            )
        staging, readback = self._buffers(logits.device)
        if _argmax_only(batch):
            return self._greedy(logits, batch, staging, readback)
        plan = _Plan.build(batch, logits.shape[1])
        dev = plan.pack.send(staging)  # the one host-to-device copy
        logits = logits.to(torch.float32, copy=True)  # (B, V)
        raw = None  # (R, V), before any change
        if plan.lp_rows:
            raw = logits.clone() if "lp_rows" not in dev else logits.index_select(0, dev["lp_rows"])

        _apply_blocked(logits, dev)
        _apply_penalties(logits, plan, dev)
        token_ids = self._pick(logits, plan, dev)  # (B,)
        num_rows = len(batch)

        if raw is None:
            fetch = readback.start(token_ids)
            return PendingSample(
                token_ids, lambda: SamplerOutput(fetch.wait().tolist(), [None] * num_rows)
            )
        nums = [batch.params[i].logprobs or 0 for i in plan.lp_rows]
        found = _logprob_tensors(raw, _rows(token_ids, dev, "lp_rows"), max(nums))
        fetch = readback.start(_pack_results(token_ids, *found))
        lp_rows = plan.lp_rows

        def finish() -> SamplerOutput:
            host = fetch.wait()  # the one sync
            ids, entries = _unpack_results(host, num_rows, lp_rows, nums)
            logprobs: list[TokenLogprobs | None] = [None] * num_rows
            for i, entry in zip(lp_rows, entries, strict=True):
                logprobs[i] = entry
            return SamplerOutput(token_ids=ids, logprobs=logprobs)

        return PendingSample(token_ids, finish)

    def _greedy(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        staging: StagingBuffer,
        readback: _ReadBack,
    ) -> PendingSample:
        """Fast path: every row greedy, without penalties or logprobs."""
        if any(batch.blocked_token_ids):
            pack = _Pack()
            _stage_blocked(pack, batch.blocked_token_ids, logits.shape[1])
            dev = pack.send(staging)
            if dev:
                logits = logits.clone()
                _apply_blocked(logits, dev)
        token_ids = logits.argmax(dim=-1)
        fetch = readback.start(token_ids)
        num_rows = len(batch)
        return PendingSample(
            token_ids, lambda: SamplerOutput(fetch.wait().tolist(), [None] * num_rows)
        )

    def _pick(
        self, logits: torch.Tensor, plan: _Plan, dev: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Greedy rows take the argmax; the others sample. Returns ``(B,)`` int64."""
        if not plan.sample_rows:
            return logits.argmax(dim=-1)
        probs = _filtered_probs(_rows(logits, dev, "sample_rows"), dev)  # (S, V)
        noise = self._noise(probs, plan, dev)  # (S, V)
        picked = (probs / noise).argmax(dim=-1)  # (S,)
        if "sample_rows" not in dev:
            return picked
        return logits.argmax(dim=-1).index_copy_(0, dev["sample_rows"], picked)

    def _noise(
        self, probs: torch.Tensor, plan: _Plan, dev: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like ``probs`` (S, V); each seeded row from its own generator."""
        draw = None
        if plan.shared:
            draw = torch.empty((len(plan.shared), probs.shape[1]), device=probs.device)
            draw.exponential_(generator=self.generator)
        if draw is not None and "shared_rows" not in dev:
            noise = draw  # every row draws from the sampler's generator
        else:
            noise = torch.empty_like(probs)  # (S, V)
            if draw is not None:
                noise.index_copy_(0, dev["shared_rows"], draw)
            for j, g in enumerate(plan.sample_generators):
                if g is not None:
                    noise[j].exponential_(generator=g)
        # A zero draw would turn a filtered token's 0 / 0 into NaN.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


# ---- device steps ----------------------------------------------------------------------


def _apply_blocked(logits: torch.Tensor, dev: dict[str, torch.Tensor]) -> None:
    pairs = dev.get("blocked")
    if pairs is not None:
        n = pairs.numel() // 2
        logits.index_put_((pairs[:n], pairs[n:]), logits.new_full((), -torch.inf))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Apply repetition, then presence and frequency penalties to ``logits`` (B, V) in place."""
    plan = _Plan.build(batch, logits.shape[1])
    dev = plan.pack.send(StagingBuffer(logits.device, max(plan.pack.size, 1)))
    _apply_penalties(logits, plan, dev)


def _apply_penalties(logits: torch.Tensor, plan: _Plan, dev: dict[str, torch.Tensor]) -> None:
    if not plan.penalty_rows:
        return
    rows, vocab = len(plan.penalty_rows), logits.shape[1]
    sub = _rows(logits, dev, "penalty_rows")  # (P, V)
    # Token counts of the outputs, (P, V + 1): the extra column takes ids outside [0, V).
    counts = torch.zeros(rows * (vocab + 1), device=logits.device)
    if "output_ids" in dev:
        ids = dev["output_ids"]
        counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
    if "pending_dst" in dev and plan.pending_tokens is not None:
        # each such row's newest output is still only on the device (async scheduling)
        tokens = plan.pending_tokens.index_select(0, dev["pending_src"])
        ids = dev["pending_dst"] * (vocab + 1) + tokens
        counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
    counts = counts.view(rows, vocab + 1)
    out_counts = counts[:, :vocab]  # (P, V)

    if "repetition" in dev:
        seen = counts > 0  # (P, V + 1), then the prompt's tokens too
        if "prompt_ids" in dev:
            seen.view(-1).index_fill_(0, dev["prompt_ids"], True)
        rep = dev["repetition"].unsqueeze(1)  # (P, 1)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen[:, :vocab], penalized, sub)
    if "presence" in dev:
        presence, frequency = dev["presence"].unsqueeze(1), dev["frequency"].unsqueeze(1)
        sub = sub - presence * (out_counts > 0) - frequency * out_counts
    if "penalty_rows" in dev:
        logits.index_copy_(0, dev["penalty_rows"], sub)
    elif sub is not logits:
        logits.copy_(sub)


def _filtered_probs(logits: torch.Tensor, dev: dict[str, torch.Tensor]) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p: ``(S, V)`` logits to unnormalised probs."""
    logits = logits / dev["temperature"].unsqueeze(1)  # (S, V)
    if "top_k" in dev:
        logits = _top_k_top_p(logits, dev["top_k"].unsqueeze(1), dev["top_p"].unsqueeze(1))
    probs = logits.softmax(dim=-1)  # (S, V)
    if "min_p" in dev:
        threshold = probs.amax(dim=-1, keepdim=True) * dev["min_p"].unsqueeze(1)  # (S, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` what top-k (S, 1) int64, ``V`` when off, and top-p (S, 1) drop,
    for ``(S, V)`` logits."""
    vocab, device = logits.shape[1], logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (S, V)
    position = torch.arange(vocab, device=device).unsqueeze(0)  # (1, V)
    sorted_logits = sorted_logits.masked_fill(position >= top_k, -torch.inf)
    probs = sorted_logits.softmax(dim=-1)  # (S, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V); 0 for the first token
    # top_p == 1 is off: cumsum rounding must not drop the tail.
    drop = (mass_before >= top_p) & (top_p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


# ---- logprobs and the read-back ----------------------------------------------------------


def _logprob_tensors(
    raw: torch.Tensor, sampled: torch.Tensor, num: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For raw logits (R, V) and the sampled tokens (R,): the sampled tokens' logprobs
    (R,) and ranks (R,), and the top ``num`` logprobs, ids and ranks (R, num).

    A token's rank is 1 + the number of tokens with a strictly higher logprob.
    """
    logprobs = raw.log_softmax(dim=-1)  # (R, V)
    sampled_lp = logprobs.gather(1, sampled.unsqueeze(1))  # (R, 1)
    sampled_rank = (logprobs > sampled_lp).sum(dim=-1) + 1  # (R,)
    top_lp, top_ids = logprobs.topk(num, dim=-1)  # (R, N), sorted
    # Anything above the j-th largest is among the first j, so compare within top-N.
    top_rank = (top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=-1) + 1  # (R, N)
    return sampled_lp.squeeze(1), sampled_rank, top_lp, top_ids, top_rank


def _pack_results(
    token_ids: torch.Tensor,
    sampled_lp: torch.Tensor,
    sampled_rank: torch.Tensor,
    top_lp: torch.Tensor,
    top_ids: torch.Tensor,
    top_rank: torch.Tensor,
) -> torch.Tensor:
    """One int64 vector: token ids (B), sampled ranks (R), top ids (R*N), top ranks
    (R*N), then the logprobs (R + R*N) as float64 bits (exact for float32 values)."""
    floats = torch.cat([sampled_lp, top_lp.reshape(-1)]).to(torch.float64)
    return torch.cat(
        [
            token_ids,
            sampled_rank,
            top_ids.reshape(-1),
            top_rank.reshape(-1),
            floats.view(torch.int64),
        ]
    )


def _unpack_results(
    host: np.ndarray, num_rows: int, lp_rows: list[int], nums: list[int]
) -> tuple[list[int], list[TokenLogprobs]]:
    """Undo :func:`_pack_results` on the host: token ids and one entry per logprob row."""
    r, n = len(lp_rows), max(nums)
    token_ids = host[:num_rows].tolist()
    at = num_rows
    sampled_rank = host[at : at + r].tolist()
    at += r
    top_ids = host[at : at + r * n].reshape(r, n).tolist()
    at += r * n
    top_rank = host[at : at + r * n].reshape(r, n).tolist()
    at += r * n
    floats = host[at:].view(np.float64)
    sampled_lp = floats[:r].tolist()
    top_lp = floats[r:].reshape(r, n).tolist()
    rows = zip(
        [token_ids[i] for i in lp_rows],
        sampled_lp,
        sampled_rank,
        top_ids,
        top_lp,
        top_rank,
        nums,
        strict=True,
    )
    entries = [
        TokenLogprobs(
            sampled=Logprob(tok, lp, rank),
            top=tuple(Logprob(*x) for x in zip(ids[:k], lps[:k], ranks[:k], strict=True)),
        )
        for tok, lp, rank, ids, lps, ranks, k in rows
    ]
    return token_ids, entries
