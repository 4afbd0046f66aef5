"""paged_attention against a dense reference, over shuffled block tables."""

from __future__ import annotations

import math

import pytest
import torch

import lmfleet.engine.layers.attention as attention
from lmfleet.engine.layers.attention import paged_attention, write_kv
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

    def __init__(self, block_size: int, num_blocks: int = 64, seed: int = 0) -> None:
        self.layout = BlockLayout(num_blocks, block_size, seed=seed)
        self.cache = torch.full((2, num_blocks, block_size, N_KV, HEAD_DIM), float("nan"))
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
            qs.append(torch.randn(n, N_HEADS, HEAD_DIM, generator=self.gen))
            ks.append(torch.randn(n, N_KV, HEAD_DIM, generator=self.gen))
            vs.append(torch.randn(n, N_KV, HEAD_DIM, generator=self.gen))
            self.keys[seq] = torch.cat([self.keys.get(seq, ks[-1][:0]), ks[-1]])
            self.values[seq] = torch.cat([self.values.get(seq, vs[-1][:0]), vs[-1]])
            self.done[seq] = done + n
        meta = self.layout.metadata(steps)
        out = paged_attention(
            torch.cat(qs), torch.cat(ks), torch.cat(vs), self.cache, meta, HEAD_DIM**-0.5
        )
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
