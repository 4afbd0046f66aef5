"""paged_attention against a dense reference, over shuffled block tables."""

from __future__ import annotations

import math

import pytest
import torch

import lmfleet.engine.layers.attention as attention
from lmfleet.engine.layers.attention import (
    FP8_KV_DTYPE,
    kv_cache_torch_dtype,
    paged_attention,
    to_fp8,
    write_kv,
)
from tests.engine.layers.paged_kv import BlockLayout

N_HEADS, N_KV, HEAD_DIM = 8, 2, 16


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``L`` positions of a sequence over all ``S``:
    q (L, H, hd), k/v (S, n_kv, hd) -> (L, H, hd)."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (S, H, hd)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) / math.sqrt(q.shape[-1])
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hls,shd->lhd", scores.softmax(-1), v.double()).to(q.dtype)


class _World:
    """Full K/V histories per sequence, laid into a shuffled paged cache step by step."""

    def __init__(
        self,
        block_size: int,
        num_blocks: int = 64,
        seed: int = 0,
        kv_dtype: torch.dtype = torch.float32,
        kv_scales: tuple[float, float] = (1.0, 1.0),
        kv_mult: tuple[float, float] = (1.0, 1.0),
        q_mult: float = 1.0,
    ) -> None:
        self.layout = BlockLayout(num_blocks, block_size, seed=seed)
        shape = (2, num_blocks, block_size, N_KV, HEAD_DIM)
        self.cache = torch.full(shape, float("nan"), dtype=kv_dtype)
        self.kv_scales = kv_scales
        #: Q, K and V are drawn as randn times these
        self.kv_mult, self.q_mult = kv_mult, q_mult
        #: the reference attends over K/V as the cache stores them: the values the
        #: rounded fp8 bytes stand for
        self.stored_k, self.stored_v = (
            [(lambda x, s=s: to_fp8(x, s).float() * s) for s in kv_scales]
            if kv_dtype == FP8_KV_DTYPE
            else [lambda x: x, lambda x: x]
        )
        self.outputs: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.done: dict[int, int] = {}

    def step(self, entries: list[tuple[int, int]]) -> None:
        """Run ``(seq, new tokens)`` entries as one batch and check every output."""
        steps = []
        qs, ks, vs = [], [], []
        for seq, n in entries:
            done = self.done.get(seq, 0)
            steps.append((seq, n, done + n))
            qs.append(torch.randn(n, N_HEADS, HEAD_DIM, generator=self.gen) * self.q_mult)
            ks.append(torch.randn(n, N_KV, HEAD_DIM, generator=self.gen) * self.kv_mult[0])
            vs.append(torch.randn(n, N_KV, HEAD_DIM, generator=self.gen) * self.kv_mult[1])
            self.keys[seq] = torch.cat([self.keys.get(seq, ks[-1][:0]), self.stored_k(ks[-1])])
            self.values[seq] = torch.cat([self.values.get(seq, vs[-1][:0]), self.stored_v(vs[-1])])
            self.done[seq] = done + n
        meta = self.layout.metadata(steps)
        q = torch.cat(qs)
        out = paged_attention(
            q, torch.cat(ks), torch.cat(vs), self.cache, meta, HEAD_DIM**-0.5, *self.kv_scales
        )
        self.outputs.append(out)
        offset = 0
        for (seq, n), q in zip(entries, qs, strict=True):
            want = _dense(q, self.keys[seq], self.values[seq])
            torch.testing.assert_close(out[offset : offset + n], want, atol=1e-5, rtol=1e-5)
            offset += n


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("min_batched", [2, 10**9])
def test_mixed_prefill_chunked_and_decode(
    block_size: int, min_batched: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "BATCHED_DECODE_MIN_SEQS", min_batched)
    world = _World(block_size, num_blocks=256 // block_size + 8)
    world.step([(0, 9)])  # prefill from 0
    world.step([(0, 6), (1, 17)])  # chunked prefill over cached context + a new prefill
    world.step([(0, 1), (1, 1), (2, 3)])  # two decodes and a prefill
    world.step([(1, 1), (2, 1), (0, 1), (3, 1)])  # pure decode, one of them a 1-token prompt
    world.step([(3, 1), (2, 5), (1, 1)])  # decodes around a chunk


def test_batched_decode_in_small_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched decode path gathers a few sequences at a time; results don't change."""
    monkeypatch.setattr(attention, "DECODE_GATHER_BYTES", 1)
    world = _World(block_size=4)
    world.step([(s, 3 + 2 * s) for s in range(5)])
    world.step([(s, 1) for s in range(5)])
    world.step([(s, 1) for s in (4, 0, 2)])


def test_write_kv_puts_each_token_in_its_slot() -> None:
    cache = torch.zeros(2, 4, 2, 1, 3)
    k = torch.arange(9.0).view(3, 1, 3)
    slots = torch.tensor([5, 0, 3])
    write_kv(k, -k, cache, slots)
    flat = cache.view(2, 8, 1, 3)
    torch.testing.assert_close(flat[0, slots], k)
    torch.testing.assert_close(flat[1, slots], -k)
    assert flat[0, [1, 2, 4, 6, 7]].abs().sum() == 0


def test_bfloat16_runs_and_stays_close() -> None:
    layout = BlockLayout(8, 4)
    meta = layout.metadata([(0, 6, 6), (1, 5, 5)])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(11, N_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(11, N_KV, HEAD_DIM, generator=gen)
    v = torch.randn(11, N_KV, HEAD_DIM, generator=gen)
    cache = torch.zeros(2, 8, 4, N_KV, HEAD_DIM, dtype=torch.bfloat16)
    bf = torch.bfloat16
    out = paged_attention(q.to(bf), k.to(bf), v.to(bf), cache, meta, HEAD_DIM**-0.5)
    assert out.dtype == bf
    torch.testing.assert_close(out[:6].float(), _dense(q[:6], k[:6], v[:6]), atol=3e-2, rtol=3e-2)


def _mixed_steps(world: _World) -> torch.Tensor:
    """Prefill, chunked prefill over cached context, mixed and pure decode; every
    output of every step, concatenated."""
    world.step([(0, 9), (1, 1)])
    world.step([(0, 6), (1, 17)])
    world.step([(0, 1), (1, 1), (2, 3)])
    world.step([(1, 1), (2, 1), (0, 1)])
    world.step([(2, 5), (0, 1)])
    return torch.cat(world.outputs)


@pytest.mark.parametrize("min_batched", [2, 10**9])
def test_fp8_cache_is_exact_over_rounded_kv_and_close_to_full_precision(
    min_batched: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fp8 cache attends exactly as dense attention over the rounded K/V (every
    step checks that, prefill included), and stays within a few percent of the same
    steps over an fp32 cache; the cache really holds one byte per element."""
    monkeypatch.setattr(attention, "BATCHED_DECODE_MIN_SEQS", min_batched)
    fp8 = _World(block_size=4, kv_dtype=torch.float8_e4m3fn)
    full = _World(block_size=4)
    out8, out32 = _mixed_steps(fp8), _mixed_steps(full)
    rel = ((out8 - out32).norm() / out32.norm()).item()
    assert 1e-3 < rel < 5e-2, rel  # measured 0.033
    assert fp8.cache.dtype == torch.float8_e4m3fn
    bf16_bytes = fp8.cache.numel() * torch.bfloat16.itemsize
    assert fp8.cache.nbytes * 2 == bf16_bytes and full.cache.nbytes == 4 * fp8.cache.nbytes


@pytest.mark.parametrize("min_batched", [2, 10**9])
def test_fp8_scales_keep_large_and_small_values(
    min_batched: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of about +-500 (a third beyond fp8's 448; queries 1/500 as large, so the
    scores are ordinary) and values of about 1e-3 (fp8 subnormals): with scale 1.0 the
    keys saturate and the values lose their mantissa, so attention is far off; with
    scales that bring both into range it is as close as for unit values (0.033, see
    above). Every step is still exact against dense attention over what the cache
    stands for (``stored * scale``)."""
    monkeypatch.setattr(attention, "BATCHED_DECODE_MIN_SEQS", min_batched)
    mult, q_mult = (500.0, 1e-3), 1 / 500
    full = _mixed_steps(_World(block_size=4, kv_mult=mult, q_mult=q_mult))
    errors = {}
    for scales in ((1.0, 1.0), (8.0, 1e-5)):
        world = _World(
            block_size=4, kv_dtype=FP8_KV_DTYPE, kv_scales=scales, kv_mult=mult, q_mult=q_mult
        )
        out = _mixed_steps(world)
        errors[scales] = ((out - full).norm() / full.norm()).item()
    print(errors)
    assert errors[1.0, 1.0] > 0.3, errors  # measured 0.58
    assert errors[8.0, 1e-5] < 5e-2, errors  # measured 0.031


def test_fp8_scaled_write_stores_the_scaled_cast() -> None:
    """The stored bytes are those of ``fp8(clamp(x * fp32(1 / scale)))``."""
    cache = torch.zeros(2, 4, 2, 1, 3, dtype=torch.float8_e4m3fn)
    k = torch.tensor([[3000.0, -3000.0, 0.3]]).view(1, 1, 3)
    v = torch.tensor([[1e-4, -2e-3, 5.0]]).view(1, 1, 3)
    write_kv(k, v, cache, torch.tensor([2]), 10.0, 0.01)
    flat = cache.view(2, 8, 1, 3).float()
    assert flat[0, 2].flatten().tolist() == [
        288.0,
        -288.0,
        torch.tensor(0.03).to(FP8_KV_DTYPE).item(),
    ]
    assert flat[1, 2].flatten().tolist() == [
        torch.tensor(0.01).to(FP8_KV_DTYPE).item(),
        -0.203125,
        448.0,  # 500 saturates
    ]
    assert (
        to_fp8(k, 10.0).view(torch.uint8).tolist()
        == flat[0, 2].to(FP8_KV_DTYPE).view(torch.uint8).view(1, 1, 3).tolist()
    )


def test_kv_scales_are_checked() -> None:
    fp8 = torch.zeros(2, 4, 2, 1, 3, dtype=torch.float8_e4m3fn)
    full = torch.zeros(2, 4, 2, 1, 3)
    k = torch.ones(1, 1, 3)
    slots = torch.tensor([0])
    with pytest.raises(ValueError, match=r"v_scale must be finite and > 0, got 0\.0"):
        write_kv(k, k, fp8, slots, 1.0, 0.0)
    with pytest.raises(ValueError, match="k_scale must be finite and > 0, got nan"):
        write_kv(k, k, fp8, slots, float("nan"), 1.0)
    with pytest.raises(ValueError, match="KV scales apply to an fp8 cache only"):
        write_kv(k, k, full, slots, 2.0, 1.0)
    write_kv(k, k, full, slots)  # a full-precision cache with unit scales is fine


def test_fp8_write_saturates_and_rounds_like_a_cast() -> None:
    cache = torch.zeros(2, 4, 2, 1, 3, dtype=torch.float8_e4m3fn)
    k = torch.tensor([[1e4, -1e4, 0.3]]).view(1, 1, 3)
    v = torch.tensor([[float("inf"), 447.0, -1e-3]]).view(1, 1, 3)
    write_kv(k, v, cache, torch.tensor([5]))
    flat = cache.view(2, 8, 1, 3).float()
    rounded = torch.tensor(0.3).to(FP8_KV_DTYPE).item()
    assert flat[0, 5].flatten().tolist() == [448.0, -448.0, rounded]
    assert flat[1, 5].flatten().tolist()[:2] == [448.0, 448.0]
    assert flat[1, 5, 0, 2] == torch.tensor(-1e-3).to(FP8_KV_DTYPE).float()
    assert flat[:, [0, 1, 2, 3, 4, 6, 7]].abs().sum() == 0


def test_fp8_cache_with_bfloat16_queries() -> None:
    """bf16 model, fp8 cache: the output is bf16 and close to dense attention over
    the rounded K/V."""
    layout = BlockLayout(8, 4)
    meta = layout.metadata([(0, 6, 6), (1, 5, 5)])
    gen = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    q, k, v = (torch.randn(11, h, HEAD_DIM, generator=gen).to(bf) for h in (N_HEADS, N_KV, N_KV))
    cache = torch.zeros(2, 8, 4, N_KV, HEAD_DIM, dtype=kv_cache_torch_dtype("fp8", bf))
    out = paged_attention(q, k, v, cache, meta, HEAD_DIM**-0.5)
    assert out.dtype == bf
    want = _dense(q[:6].float(), to_fp8(k[:6]).float(), to_fp8(v[:6]).float())
    torch.testing.assert_close(out[:6].float(), want, atol=3e-2, rtol=3e-2)
    # decode over that cache: the batched path reads the fp8 blocks back
    meta = layout.metadata([(0, 1, 7), (1, 1, 6)])
    k1, v1 = (torch.randn(2, N_KV, HEAD_DIM, generator=gen).to(bf) for _ in range(2))
    q1 = torch.randn(2, N_HEADS, HEAD_DIM, generator=gen).to(bf)
    out = paged_attention(q1, k1, v1, cache, meta, HEAD_DIM**-0.5)
    keys = to_fp8(torch.cat([k[6:], k1[1:]])).float()
    values = to_fp8(torch.cat([v[6:], v1[1:]])).float()
    torch.testing.assert_close(
        out[1:].float(), _dense(q1[1:].float(), keys, values), atol=3e-2, rtol=3e-2
    )


def test_kv_cache_dtype_names() -> None:
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_torch_dtype("fp4", torch.float32)
