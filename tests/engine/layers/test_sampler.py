from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmfleet.engine.layers import sampler as sampler_module
from lmfleet.engine.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    blocked_token_ids,
)
from lmfleet.engine.request import Request, SamplingParams
from lmfleet.engine.step_inputs import StagingBuffer


def make_batch(
    params: list[SamplingParams],
    *,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    blocked: list[tuple[int, ...]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        generators=generators or [None] * n,
        prompt_token_ids=prompts or [[] for _ in range(n)],
        output_token_ids=outputs or [[] for _ in range(n)],
        blocked_token_ids=blocked or [() for _ in range(n)],
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """Sample ``n`` times from one distribution, as ``n`` identical unseeded rows."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()  # (n, V)
    return Sampler(seed=seed)(logits, make_batch([params] * n)).token_ids


# Six tokens, shuffled so the likely ones are not simply the low ids.
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
PERM = [3, 0, 5, 1, 4, 2]  # token PERM[j] has probability PROBS[j]


def crafted_logits() -> torch.Tensor:
    logits = torch.empty(len(PROBS))
    for j, p in enumerate(PROBS):
        logits[PERM[j]] = math.log(p)
    return logits  # (V,)


# --- greedy and near-greedy -------------------------------------------------------


@pytest.mark.parametrize("with_logprobs", [False, True])  # fast path and full path
def test_greedy_takes_argmax(with_logprobs: bool) -> None:
    logits = torch.randn(16, 50, generator=seeded(1))
    params = SamplingParams(temperature=0.0, logprobs=1 if with_logprobs else None)
    out = Sampler()(logits, make_batch([params] * 16))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_sampler_does_not_modify_logits() -> None:
    logits = torch.randn(4, 10, generator=seeded(2))
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=3, repetition_penalty=1.5)
    Sampler()(logits, make_batch([params] * 4, outputs=[[1, 2]] * 4, blocked=[(0,)] * 4))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-3, 1e-7])
def test_tiny_temperature_behaves_greedily(temperature: float) -> None:
    logits = torch.randn(500, 40, generator=seeded(3)) * 3
    top2 = logits.topk(2, dim=-1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.05  # clear winners only
    logits = logits[keep]
    params = SamplingParams(temperature=temperature)
    out = Sampler()(logits, make_batch([params] * logits.shape[0]))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, min_p=1.0),
    ],
    ids=["top_k=1", "top_p tiny", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = torch.randn(300, 64, generator=seeded(4))
    out = Sampler()(logits, make_batch([params] * 300))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


# --- filters and the sampled distribution -------------------------------------------


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_k=3), 3),
        (SamplingParams(top_p=0.7), 3),  # mass before the 3rd token is 0.65 < 0.7
        (SamplingParams(top_p=0.6), 2),
        (SamplingParams(min_p=0.3), 3),  # threshold 0.12
        (SamplingParams(top_k=4, min_p=0.5), 2),  # threshold 0.2
        (SamplingParams(top_k=5, top_p=0.5), 2),
    ],
)
def test_filters_never_sample_dropped_tokens(params: SamplingParams, kept: int) -> None:
    n = 20_000
    counts = Counter(draw(crafted_logits(), params, n, seed=5))
    assert set(counts) == set(PERM[:kept])
    # The kept tokens keep their relative probabilities.
    mass = sum(PROBS[:kept])
    for j in range(kept):
        assert counts[PERM[j]] / n == pytest.approx(PROBS[j] / mass, abs=0.015)


def chi_square(counts: Counter[int], probs: list[float], n: int) -> float:
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in enumerate(probs))


def test_sampled_frequencies_follow_softmax_over_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature, n = 0.8, 20_000
    probs = (logits / temperature).softmax(dim=-1).tolist()
    counts = Counter(draw(logits, SamplingParams(temperature=temperature), n, seed=6))
    # 7 degrees of freedom: P(chi2 > 40) is about 1e-6.
    assert chi_square(counts, probs, n) < 40


def test_seeded_row_follows_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    probs = logits.softmax(dim=-1).tolist()
    sampler, gen, n = Sampler(), seeded(7), 3_000
    batch = make_batch([SamplingParams(seed=7)], generators=[gen])
    counts = Counter(sampler(logits.unsqueeze(0), batch).token_ids[0] for _ in range(n))
    assert chi_square(counts, probs, n) < 35  # 3 degrees of freedom


# --- seeds ----------------------------------------------------------------------------

VOCAB = 32
TARGET = SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5, seed=1234)


def step_logits(key: int, step: int) -> torch.Tensor:
    """A fake model: the logits of request ``key`` at ``step``, (V,)."""
    return torch.randn(VOCAB, generator=seeded(key * 1000 + step)) * 2


def run_steps(layout: list[tuple[int, SamplingParams]], steps: int, sampler_seed: int) -> dict:
    """Decode ``steps`` tokens for every (key, params) row; return each key's tokens."""
    sampler = Sampler(seed=sampler_seed)
    gens = [None if p.seed is None else seeded(p.seed) for _, p in layout]
    outputs: list[list[int]] = [[] for _ in layout]
    for step in range(steps):
        logits = torch.stack([step_logits(key, step) for key, _ in layout])  # (B, V)
        batch = make_batch(
            [p for _, p in layout],
            prompts=[[key % VOCAB] for key, _ in layout],
            outputs=outputs,
            generators=gens,
        )
        for out, tok in zip(outputs, sampler(logits, batch).token_ids, strict=True):
            out.append(tok)
    return {key: out for (key, _), out in zip(layout, outputs, strict=True)}


def test_seeded_request_is_independent_of_the_batch() -> None:
    alone = run_steps([(0, TARGET)], steps=24, sampler_seed=0)[0]
    others = [
        (1, SamplingParams()),
        (2, SamplingParams(seed=99, top_p=0.9)),
        (3, SamplingParams(temperature=0.0, logprobs=3)),
        (4, SamplingParams(frequency_penalty=1.0, min_p=0.1)),
    ]
    layouts = [
        [(0, TARGET), *others[:2]],
        [*others[:2], (0, TARGET)],
        [others[1], (0, TARGET), others[2], others[3]],
        [*others, (0, TARGET)],
        [others[0], (0, TARGET), (5, TARGET)],  # another request with the same seed
    ]
    for i, layout in enumerate(layouts):
        assert run_steps(layout, steps=24, sampler_seed=100 + i)[0] == alone, layout


def test_different_seeds_give_different_tokens() -> None:
    a = run_steps([(0, TARGET)], steps=24, sampler_seed=0)[0]
    other = SamplingParams(temperature=1.0, top_k=20, presence_penalty=0.5, seed=4321)
    b = run_steps([(0, other)], steps=24, sampler_seed=0)[0]
    assert a != b


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    layout = [(0, SamplingParams()), (1, SamplingParams())]
    assert run_steps(layout, 16, sampler_seed=3) == run_steps(layout, 16, sampler_seed=3)
    assert run_steps(layout, 16, sampler_seed=3) != run_steps(layout, 16, sampler_seed=4)


# --- penalties ------------------------------------------------------------------------

ROW = [2.0, -1.0, 0.5, -0.5, 3.0]


def penalized(params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    logits = torch.tensor([ROW, ROW])  # row 1 has no penalties and must not change
    batch = make_batch(
        [params, SamplingParams()], prompts=[prompt, prompt], outputs=[output, output]
    )
    apply_penalties(logits, batch)
    assert logits[1].tolist() == ROW
    return logits[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    got = penalized(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1, 1, 3])
    assert got == [1.0, -2.0, 0.5, -1.0, 3.0]


def test_repetition_penalty_below_one_rewards_seen_tokens() -> None:
    got = penalized(SamplingParams(repetition_penalty=0.5), prompt=[0, 1], output=[])
    assert got == [4.0, -0.5, 0.5, -0.5, 3.0]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = penalized(params, prompt=[0, 4, 4], output=[1, 1, 3])
    assert got == pytest.approx([2.0, -1.0 - 0.5 - 0.5, 0.5, -0.5 - 0.5 - 0.25, 3.0])


def test_negative_presence_and_frequency_penalties_encourage_repeats() -> None:
    params = SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)
    got = penalized(params, prompt=[], output=[2, 2])
    assert got == pytest.approx([2.0, -1.0, 0.5 + 1.0 + 1.0, -0.5, 3.0])


def test_repetition_then_presence_and_frequency() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0)
    got = penalized(params, prompt=[4], output=[0])
    assert got == pytest.approx([2.0 / 2 - 2.0, -1.0, 0.5, -0.5, 3.0 / 2])


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([ROW])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    out = Sampler()(logits, make_batch([params], outputs=[[4, 4]]))
    assert out.token_ids == [0]  # 3.0 - 2.0 < 2.0


# --- blocked tokens -------------------------------------------------------------------


def test_blocked_argmax_is_never_picked() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    greedy = SamplingParams(temperature=0.0)
    out = Sampler()(logits, make_batch([greedy], blocked=[(1, 99)]))  # 99 is outside V
    assert out.token_ids == [3]

    n = 5_000
    many = logits.expand(n, -1).contiguous()
    params = SamplingParams(temperature=2.0)
    out = Sampler(seed=8)(many, make_batch([params] * n, blocked=[(1, 3)] * n))
    assert set(out.token_ids) == {0, 2}


def test_blocked_token_ids_until_min_tokens() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=(7, 8))
    request = Request("r", [1, 2], params, eos_token_ids=frozenset({2, 0}))
    assert blocked_token_ids(request) == (0, 2, 7, 8)
    request.output_token_ids.append(5)
    assert blocked_token_ids(request) == (0, 2, 7, 8)
    request.output_token_ids.append(5)
    assert blocked_token_ids(request) == ()

    ignoring = Request(
        "s", [1], SamplingParams(min_tokens=1, ignore_eos=True), eos_token_ids=frozenset({0})
    )
    assert blocked_token_ids(ignoring) == ()


def test_batch_from_requests() -> None:
    gen = seeded(1)
    a = Request("a", [1, 2], SamplingParams(seed=1, min_tokens=1), eos_token_ids=frozenset({0}))
    b = Request("b", [3], SamplingParams(), eos_token_ids=frozenset({0}))
    b.output_token_ids.append(4)
    batch = SamplingBatch.from_requests([a, b], [gen, None])
    assert batch.params == [a.sampling_params, b.sampling_params]
    assert batch.generators == [gen, None]
    assert batch.prompt_token_ids == [[1, 2], [3]]
    assert batch.output_token_ids == [[], [4]]
    assert batch.blocked_token_ids == [(0,), ()]
    with pytest.raises(ValueError, match="one generator"):
        SamplingBatch.from_requests([a, b], [gen])


# --- logprobs -------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    logits = torch.randn(3, 20, generator=seeded(9))
    params = SamplingParams(temperature=0.5, top_k=4, repetition_penalty=1.3, logprobs=5)
    batch = make_batch([params] * 3, prompts=[[0, 1, 2]] * 3, blocked=[(3,)] * 3)
    out = Sampler()(logits, batch)
    expected = logits.log_softmax(dim=-1)
    for row, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lp is not None
        assert lp.sampled.token_id == tok
        assert lp.sampled.logprob == pytest.approx(expected[row, tok].item(), abs=1e-6)
        top_values, top_ids = expected[row].topk(5)
        assert [x.token_id for x in lp.top] == top_ids.tolist()
        assert [x.logprob for x in lp.top] == pytest.approx(top_values.tolist(), abs=1e-6)
        assert [x.rank for x in lp.top] == [1, 2, 3, 4, 5]


def test_sampled_rank_outside_top_n() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=2)
    out = Sampler()(logits, make_batch([params], blocked=[(0, 1, 2)]))
    lp = out.logprobs[0]
    assert out.token_ids == [3]
    assert lp is not None
    assert (lp.sampled.token_id, lp.sampled.rank) == (3, 4)
    assert [(x.token_id, x.rank) for x in lp.top] == [(0, 1), (1, 2)]


def test_logprob_ranks_with_ties_and_zero_top() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0]])
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(logprobs=0)]
    out = Sampler()(logits, make_batch(params, blocked=[(1, 2), ()]))
    first, second = out.logprobs
    assert first is not None and second is not None
    assert (first.sampled.token_id, first.sampled.rank) == (0, 3)
    assert [x.rank for x in first.top] == [1, 1, 3]
    assert {x.token_id for x in first.top[:2]} == {1, 2}
    assert second.top == ()
    assert second.sampled.token_id == out.token_ids[1]


def test_rows_without_logprobs_get_none() -> None:
    logits = torch.randn(2, 8, generator=seeded(10))
    out = Sampler()(logits, make_batch([SamplingParams(), SamplingParams(logprobs=1)]))
    assert out.logprobs[0] is None
    assert out.logprobs[1] is not None


def test_logits_shape_must_match_batch() -> None:
    with pytest.raises(ValueError, match="B = 2"):
        Sampler()(torch.zeros(3, 8), make_batch([SamplingParams()] * 2))


# --- one staging copy, one read-back --------------------------------------------------

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]

MIX_VOCAB = 64
# (params, prompt, output, blocked): every step of the sampler in one batch
MIXED_ROWS: list[tuple[SamplingParams, list[int], list[int], tuple[int, ...]]] = [
    (SamplingParams(temperature=0.0), [1, 2], [], (7, 70)),
    (SamplingParams(temperature=0.0, frequency_penalty=0.7, logprobs=3), [5], [9, 9, 4], ()),
    (SamplingParams(temperature=0.7), [3], [8], ()),
    (SamplingParams(temperature=1.0, top_k=5, seed=11), [], [], ()),
    (SamplingParams(temperature=1.2, top_p=0.8, logprobs=2), [0, 1], [], ()),
    (SamplingParams(temperature=0.9, min_p=0.1, seed=12), [], [2], (3, 4, 5)),
    (
        SamplingParams(
            temperature=1.0,
            top_k=10,
            top_p=0.9,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.2,
        ),
        [6, 7, 8, 6],
        [10, 10, 11],
        (),
    ),
    (SamplingParams(temperature=0.8, top_k=3, min_p=0.2, logprobs=0, seed=13), [], [], (0,)),
    (SamplingParams(temperature=1e-3, repetition_penalty=0.5, seed=14), [12, 13], [], ()),
    (SamplingParams(temperature=0.0, repetition_penalty=2.0), [20, 21, 22], [23], (1,)),
    (SamplingParams(temperature=1.5), [], [], ()),
    (SamplingParams(temperature=1.0, min_p=0.5, seed=15), [], [], ()),
]
#: logits that make blocking and min-p decide the token: (row, token) -> logit
MIXED_OVERRIDES = {(0, 7): 10.0, (5, 3): 8.0, (7, 0): 8.0, (9, 1): 10.0, (11, 40): 3.0}


def mixed_batch(device: str) -> tuple[torch.Tensor, SamplingBatch]:
    logits = torch.randn(len(MIXED_ROWS), MIX_VOCAB, generator=seeded(21)) * 2
    logits[11] *= 0.05  # min-p 0.5 keeps only token 40, which has p ~ 0.24
    for (row, token), value in MIXED_OVERRIDES.items():
        logits[row, token] = value
    gens = [
        None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
        for p, *_ in MIXED_ROWS
    ]
    batch = make_batch(
        [p for p, *_ in MIXED_ROWS],
        prompts=[list(prompt) for _, prompt, _, _ in MIXED_ROWS],
        outputs=[list(out) for _, _, out, _ in MIXED_ROWS],
        blocked=[blocked for *_, blocked in MIXED_ROWS],
        generators=gens,
    )
    return logits.to(device), batch


def second_largest_gap(x: torch.Tensor) -> float:
    top2 = x.topk(2).values
    return (top2[0] - top2[1]).item()


def reference_tokens(logits: torch.Tensor, batch: SamplingBatch, sampler_seed: int) -> list[int]:
    """Row by row, in float64, following the module docstring; the noise is drawn as
    documented (unseeded rows: one (n, V) draw from the sampler's generator, in row
    order; seeded rows: one (V,) draw from their own). Asserts every decision has a
    margin that float32 rounding cannot cross."""
    device, vocab = logits.device, logits.shape[1]
    shared_gen = torch.Generator(device=device).manual_seed(sampler_seed)
    unseeded = [i for i, p in enumerate(batch.params) if p.temperature >= 1e-5 and p.seed is None]
    shared = torch.empty((len(unseeded), vocab), device=device).exponential_(generator=shared_gen)
    tokens = []
    for i, p in enumerate(batch.params):
        x = logits[i].double().cpu()
        for t in batch.blocked_token_ids[i]:
            if t < vocab:
                x[t] = -math.inf
        for t in set(batch.prompt_token_ids[i]) | set(batch.output_token_ids[i]):
            r = p.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
        for t, c in Counter(batch.output_token_ids[i]).items():
            x[t] -= p.presence_penalty + p.frequency_penalty * c
        if p.temperature < 1e-5:
            assert second_largest_gap(x) > 1e-3
            tokens.append(int(x.argmax()))
            continue
        probs = (x / p.temperature).softmax(dim=-1)
        order = probs.argsort(descending=True).tolist()
        keep = order[: p.top_k] if p.top_k > 0 else order
        mass = probs[keep] / probs[keep].sum()
        if p.top_p < 1.0:
            before = mass.cumsum(dim=0) - mass
            assert (before - p.top_p).abs().min() > 1e-4
            keep = [t for t, b in zip(keep, before.tolist(), strict=True) if b < p.top_p]
        kept = torch.zeros(vocab, dtype=torch.float64)
        kept[keep] = probs[keep] / probs[keep].sum()
        if p.min_p > 0.0:
            threshold = kept.max() * p.min_p
            assert (kept[keep] - threshold).abs().min() > 1e-6
            kept[kept < threshold] = 0.0
        if p.seed is None:
            noise = shared[unseeded.index(i)]
        else:
            gen = torch.Generator(device=device).manual_seed(p.seed)
            noise = torch.empty(vocab, device=device).exponential_(generator=gen)
        score = kept / noise.double().cpu()
        assert second_largest_gap(score) > 1e-3 * score.max().item()
        tokens.append(int(score.argmax()))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_matches_row_by_row_reference(device: str) -> None:
    logits, batch = mixed_batch(device)
    out = Sampler(seed=31, device=device)(logits, batch)
    assert out.token_ids == reference_tokens(logits, batch, sampler_seed=31)

    raw = logits.double().cpu().log_softmax(dim=-1)
    for row, (params, lp) in enumerate(zip(batch.params, out.logprobs, strict=True)):
        if params.logprobs is None:
            assert lp is None
            continue
        assert lp is not None
        tok = out.token_ids[row]
        assert lp.sampled.token_id == tok
        assert lp.sampled.logprob == pytest.approx(raw[row, tok].item(), abs=1e-5)
        assert lp.sampled.rank == 1 + int((raw[row] > raw[row, tok]).sum())
        values, ids = raw[row].topk(params.logprobs)
        assert [x.token_id for x in lp.top] == ids.tolist()
        assert [x.logprob for x in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert [x.rank for x in lp.top] == list(range(1, params.logprobs + 1))


def test_mixed_batch_is_reproducible_across_calls() -> None:
    """The reused buffers carry nothing from one call to the next."""
    logits, batch = mixed_batch("cpu")
    first = Sampler(seed=31)(logits, batch)
    sampler = Sampler(seed=31)
    sampler(torch.randn(3, 200), make_batch([SamplingParams(top_k=4, logprobs=2)] * 3))
    sampler.generator.manual_seed(31)
    _, batch = mixed_batch("cpu")  # fresh per-request generators
    assert sampler(logits, batch) == first


#: what must not run while the sampler queues its work: each one reads device values
#: on the host or copies host values to the device synchronously
HOST_SYNCS = {
    "tensor",
    "as_tensor",
    "from_numpy",
    "item",
    "tolist",
    "numpy",
    "cpu",
    "nonzero",
    "masked_select",
    "unique",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
}


class SyncAudit(TorchFunctionMode):
    """Records torch calls that would sync on CUDA: :data:`HOST_SYNCS`, ``.to`` a
    device, and indexing with host lists, arrays or boolean masks."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if not self.paused:
            if name in HOST_SYNCS:
                self.found.append(name)
            elif name in ("__getitem__", "__setitem__") and self._host_index(args[1]):
                self.found.append(f"{name}[host index]")
            elif name == "to" and any(
                isinstance(a, str | torch.device) for a in (*args[1:], *kwargs.values())
            ):
                self.found.append("to(device)")
        return func(*args, **kwargs)

    @staticmethod
    def _host_index(index: object) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(
            isinstance(x, list | np.ndarray)
            or (isinstance(x, torch.Tensor) and x.dtype == torch.bool)
            for x in parts
        )


@pytest.fixture
def audited(monkeypatch: pytest.MonkeyPatch) -> tuple[SyncAudit, Counter[str]]:
    """A SyncAudit that pauses inside the read-back, and counts of staging copies and
    read-backs."""
    audit, calls = SyncAudit(), Counter[str]()
    to_device = StagingBuffer.to_device
    start, wait = sampler_module._ReadBack.start, sampler_module._Fetch.wait

    def counted_to_device(self: StagingBuffer, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        calls["to_device"] += 1
        return to_device(self, *args, **kwargs)

    def counted_start(self: sampler_module._ReadBack, values: torch.Tensor):  # type: ignore[no-untyped-def]
        calls["fetch"] += 1
        return start(self, values)

    def paused_wait(self: sampler_module._Fetch) -> np.ndarray:
        audit.paused = True
        try:
            return wait(self)
        finally:
            audit.paused = False

    monkeypatch.setattr(StagingBuffer, "to_device", counted_to_device)
    monkeypatch.setattr(sampler_module._ReadBack, "start", counted_start)
    monkeypatch.setattr(sampler_module._Fetch, "wait", paused_wait)
    return audit, calls


def test_audit_catches_host_syncs() -> None:
    with SyncAudit() as audit:
        x = torch.zeros(3, 4)
        x[[0, 1]] = torch.tensor(1.0)
        bool(x.sum() > 0)
        x.to("cpu")
    assert audit.found == ["tensor", "__setitem__[host index]", "__bool__", "to(device)"]


def test_call_stages_once_and_reads_back_once(audited) -> None:  # type: ignore[no-untyped-def]
    audit, calls = audited
    logits, batch = mixed_batch("cpu")
    sampler = Sampler(seed=31)
    sampler(logits, batch)  # allocates the reused buffers
    calls.clear()
    _, batch = mixed_batch("cpu")  # fresh per-request generators
    sampler.generator.manual_seed(31)
    with audit:
        out = sampler(logits, batch)
    assert audit.found == []
    assert calls == {"to_device": 1, "fetch": 1}
    assert out.token_ids == reference_tokens(logits, batch, sampler_seed=31)


@pytest.mark.parametrize("blocked", [False, True])
def test_greedy_fast_path_stages_at_most_once(audited, blocked: bool) -> None:  # type: ignore[no-untyped-def]
    audit, calls = audited
    logits = torch.randn(8, 50, generator=seeded(22))
    top = logits.argmax(dim=-1).tolist()
    batch = make_batch(
        [SamplingParams(temperature=0.0)] * 8,
        blocked=[(t,) for t in top] if blocked else None,
    )
    sampler = Sampler()
    sampler(logits, batch)
    calls.clear()
    with audit:
        out = sampler(logits, batch)
    assert audit.found == []
    assert calls == ({"to_device": 1, "fetch": 1} if blocked else {"fetch": 1})
    if blocked:
        assert (
            out.token_ids
            == logits.scatter(1, torch.tensor(top)[:, None], -math.inf).argmax(dim=-1).tolist()
        )
    else:
        assert out.token_ids == top


def test_staging_buffer_grows_for_long_sequences() -> None:
    sampler = Sampler()
    small = make_batch([SamplingParams(repetition_penalty=1.5)], prompts=[[1]])
    sampler(torch.randn(1, 10), small)
    prompt = [t % 10 for t in range(3 * sampler_module._STAGING_SLOTS)]
    batch = make_batch(
        [SamplingParams(temperature=0.0, repetition_penalty=100.0)] * 2,
        prompts=[prompt, [0]],
        outputs=[[], [1]],
    )
    logits = torch.tensor([[5.0] * 10 + [0.5], [5.0, 5.0] + [0.5] * 9])
    assert sampler(logits, batch).token_ids == [10, 2]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("greedy", [False, True])
def test_cuda_sampler_syncs_once_at_the_read_back(
    monkeypatch: pytest.MonkeyPatch, greedy: bool
) -> None:
    """Under ``set_sync_debug_mode("error")`` nothing may sync before the read-back,
    and when the read-back starts waiting the GPU must still be busy with work queued
    before the call: nothing on the way waited for it."""
    logits, batch = mixed_batch("cuda")
    if greedy:
        batch = make_batch(
            [SamplingParams(temperature=0.0)] * len(batch), blocked=[(0, 5)] * len(batch)
        )
    sampler = Sampler(seed=31, device="cuda")
    sampler(logits, batch)  # allocates buffers, pinned memory and kernels
    waits: list[bool] = []
    wait = sampler_module._Fetch.wait

    def checked_wait(self: sampler_module._Fetch) -> np.ndarray:
        waits.append(torch.cuda.current_stream().query())  # False: the GPU is still busy
        torch.cuda.set_sync_debug_mode("default")
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(sampler_module._Fetch, "wait", checked_wait)
    if not greedy:
        logits, batch = mixed_batch("cuda")  # fresh per-request generators
    sampler.generator.manual_seed(31)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued ahead
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert waits == [False]
    if greedy:
        expected = logits.cpu().index_fill(1, torch.tensor([0, 5]), -math.inf).argmax(dim=-1)
        assert out.token_ids == expected.tolist()
    else:
        assert out.token_ids == reference_tokens(logits, batch, sampler_seed=31)


def test_penalties_count_outputs_still_on_the_device() -> None:
    """Async scheduling: a row's newest output may exist only in the previous step's
    device tokens. Counted from there, the penalties equal those of the complete
    host lists, and so do the sampled tokens."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 12, generator=gen)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(temperature=0.0),  # no penalty: its pending token is not staged
        SamplingParams(temperature=0.9, seed=3, frequency_penalty=1.2),
    ]
    prompts = [[1, 2], [3], [4], [5, 6]]
    outputs = [[7, 7], [], [2], [9]]  # complete lists...
    last = [8, 7, 5, 9]  # ...plus one newest token each
    complete = make_batch(
        params,
        prompts=prompts,
        outputs=[[*o, t] for o, t in zip(outputs, last, strict=True)],
        generators=[None, None, None, seeded(3)],
    )
    prev = torch.tensor([0, 9, 8, 7, 5, 0])  # the previous step's tokens, rows 4 1 3 2 at
    pending = SamplingBatch(
        params=params,
        generators=[None, None, None, seeded(3)],
        prompt_token_ids=prompts,
        output_token_ids=outputs,
        blocked_token_ids=[()] * 4,
        pending_tokens=prev,
        pending_index=[2, 3, 4, 1],
    )
    want, got = logits.clone(), logits.clone()
    apply_penalties(want, complete)
    apply_penalties(got, pending)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits)
    assert Sampler(seed=1)(logits, pending).token_ids == Sampler(seed=1)(logits, complete).token_ids
    # a row whose newest token is already on the host is left alone
    partial = make_batch(params, prompts=prompts, outputs=complete.output_token_ids)
    partial.pending_tokens, partial.pending_index = prev, [None] * 4
    none_pending = logits.clone()
    apply_penalties(none_pending, partial)
    assert torch.equal(none_pending, want)
