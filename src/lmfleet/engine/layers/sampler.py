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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmfleet.engine.request import Logprob, Request, SamplingParams, TokenLogprobs

#: temperatures below this are treated as greedy (dividing by them overflows)
GREEDY_EPS = 1e-5


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

    @classmethod
    def from_requests(
        cls, requests: Sequence[Request], generators: Sequence[torch.Generator | None]
    ) -> SamplingBatch:
        """Build the batch for ``requests``; ``generators[i]`` belongs to ``requests[i]``."""
        if len(generators) != len(requests):
            raise ValueError(
                f"need one generator (or None) per request: got {len(generators)} "
                f"for {len(requests)} requests"
            )
        return cls(
            params=[r.sampling_params for r in requests],
            generators=list(generators),
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            blocked_token_ids=[blocked_token_ids(r) for r in requests],
        )

    def __len__(self) -> int:
        return len(self.params)


def blocked_token_ids(request: Request) -> tuple[int, ...]:
    """The stop tokens (the EOS ids unless ``ignore_eos``, plus ``stop_token_ids``) while
    the request has fewer than ``min_tokens`` outputs; otherwise none."""
    params = request.sampling_params
    if len(request.output_token_ids) >= params.min_tokens:
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


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _argmax_only(batch: SamplingBatch) -> bool:
    return all(_is_greedy(p) and not _has_penalty(p) and p.logprobs is None for p in batch.params)


class Sampler:
    """Samples one token per row; see the module docstring for the order of steps."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        #: shared by every row without its own generator
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """``logits`` is ``(B, V)``, one row per batch row; it is not modified."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(
                f"logits must be (B, V) with B = {len(batch)} rows, got {tuple(logits.shape)}"
            )
        if _argmax_only(batch):
            return self._greedy(logits, batch)
        logits = logits.to(torch.float32, copy=True)  # (B, V)
        lp_rows = [i for i, p in enumerate(batch.params) if p.logprobs is not None]
        raw = logits[lp_rows] if lp_rows else None  # (R, V), before any change

        apply_blocked_tokens(logits, batch.blocked_token_ids)
        apply_penalties(logits, batch)
        token_ids = self._pick(logits, batch)  # (B,)

        logprobs: list[TokenLogprobs | None] = [None] * len(batch)
        if raw is not None:
            nums = [batch.params[i].logprobs or 0 for i in lp_rows]
            for i, lp in zip(lp_rows, _logprobs(raw, token_ids[lp_rows], nums), strict=True):
                logprobs[i] = lp
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def _greedy(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Fast path: every row greedy, without penalties or logprobs."""
        if any(batch.blocked_token_ids):
            logits = logits.clone()
            apply_blocked_tokens(logits, batch.blocked_token_ids)
        token_ids = logits.argmax(dim=-1).tolist()
        return SamplerOutput(token_ids=token_ids, logprobs=[None] * len(batch))

    def _pick(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Greedy rows take the argmax; the others sample. Returns ``(B,)`` int64."""
        token_ids = logits.argmax(dim=-1)  # (B,)
        rows = [i for i, p in enumerate(batch.params) if not _is_greedy(p)]
        if not rows:
            return token_ids
        params = [batch.params[i] for i in rows]
        probs = _filtered_probs(logits[rows], params)  # (S, V)
        noise = self._noise(probs, [batch.generators[i] for i in rows])  # (S, V)
        token_ids[rows] = (probs / noise).argmax(dim=-1)
        return token_ids

    def _noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise shaped like ``probs`` (S, V); each seeded row from its own generator."""
        noise = torch.empty_like(probs)  # (S, V)
        shared = [j for j, g in enumerate(generators) if g is None]
        if shared:
            draw = torch.empty((len(shared), probs.shape[1]), device=probs.device)
            noise[shared] = draw.exponential_(generator=self.generator)
        for j, g in enumerate(generators):
            if g is not None:
                noise[j].exponential_(generator=g)
        # A zero draw would turn a filtered token's 0 / 0 into NaN.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def apply_blocked_tokens(logits: torch.Tensor, blocked: Sequence[Sequence[int]]) -> None:
    """Set ``logits[i, t] = -inf`` for every ``t`` in ``blocked[i]``, in place."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(blocked):
        for t in ids:
            if t < vocab:
                rows.append(i)
                cols.append(t)
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = -torch.inf


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Apply repetition, then presence and frequency penalties to ``logits`` (B, V) in place."""
    rows = [i for i, p in enumerate(batch.params) if _has_penalty(p)]
    if not rows:
        return
    vocab, device = logits.shape[1], logits.device
    params = [batch.params[i] for i in rows]
    sub = logits[rows]  # (R, V)
    out_counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)

    def column(name: str) -> torch.Tensor:  # (R, 1)
        return torch.tensor([getattr(p, name) for p in params], device=device).unsqueeze(1)

    if any(p.repetition_penalty != 1.0 for p in params):
        prompts = [batch.prompt_token_ids[i] for i in rows]
        seen = (_token_counts(prompts, vocab, device) + out_counts) > 0  # (R, V)
        rep = column("repetition_penalty")
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        presence, frequency = column("presence_penalty"), column("frequency_penalty")
        sub = sub - presence * (out_counts > 0) - frequency * out_counts
    logits[rows] = sub


def _token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each sequence: ``(R, V)`` float32."""
    width = max((len(s) for s in seqs), default=0)
    counts = torch.zeros((len(seqs), vocab + 1), device=device)  # (R, V + 1)
    if width:
        # Pad with the id ``vocab``, which lands in the extra column and is dropped.
        padded = [s + [vocab] * (width - len(s)) for s in seqs]
        ids = torch.tensor(padded, dtype=torch.int64, device=device)  # (R, L)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, then min-p: ``(S, V)`` logits to unnormalised probs."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature.unsqueeze(1)  # (S, V)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = logits.softmax(dim=-1)  # (S, V)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p  # (S, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set to ``-inf`` what top-k and top-p drop, for ``(S, V)`` logits."""
    vocab, device = logits.shape[1], logits.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_k = torch.tensor(ks, device=device).unsqueeze(1)  # (S, 1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)  # (S, 1)

    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (S, V)
    position = torch.arange(vocab, device=device).unsqueeze(0)  # (1, V)
    sorted_logits = sorted_logits.masked_fill(position >= top_k, -torch.inf)
    probs = sorted_logits.softmax(dim=-1)  # (S, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V); 0 for the first token
    # top_p == 1 is off: cumsum rounding must not drop the tail.
    drop = (mass_before >= top_p) & (top_p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprobs(raw: torch.Tensor, sampled: torch.Tensor, nums: list[int]) -> list[TokenLogprobs]:
    """Logprobs of ``sampled`` (R,) and the top ``nums[r]`` tokens of each raw row (R, V).

    A token's rank is 1 + the number of tokens with a strictly higher logprob.
    """
    logprobs = raw.log_softmax(dim=-1)  # (R, V)
    sampled_lp = logprobs.gather(1, sampled.unsqueeze(1))  # (R, 1)
    sampled_rank = (logprobs > sampled_lp).sum(dim=-1) + 1  # (R,)
    top_lp, top_ids = logprobs.topk(max(nums), dim=-1)  # (R, N), sorted
    # Anything above the j-th largest is among the first j, so compare within top-N.
    top_rank = (top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=-1) + 1  # (R, N)

    rows = zip(
        sampled.tolist(),
        sampled_lp.squeeze(1).tolist(),
        sampled_rank.tolist(),
        top_ids.tolist(),
        top_lp.tolist(),
        top_rank.tolist(),
        nums,
        strict=True,
    )
    return [
        TokenLogprobs(
            sampled=Logprob(tok, lp, rank),
            top=tuple(Logprob(*x) for x in zip(ids[:n], lps[:n], ranks[:n], strict=True)),
        )
        for tok, lp, rank, ids, lps, ranks, n in rows
    ]
