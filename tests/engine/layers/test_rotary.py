"""Rotary embeddings: the rotate-half layout, positions gathered per token, Llama 3
scaling, and the RMSNorm that sits next to them in every layer."""

from __future__ import annotations

import math

import pytest
import torch

from lmfleet.engine.layers.norm import RMSNorm
from lmfleet.engine.layers.rotary import RotaryEmbedding, rope_inv_freq

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _reference(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (T, H, hd) rotated the textbook rotate-half way, in float64."""
    angles = pos.double()[:, None] * inv_freq.double()[None, :]  # (T, hd/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # (T, 1, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1).double()
    return (x.double() * emb.cos() + rotated * emb.sin()).to(x.dtype)


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_matches_reference_at_scattered_positions(scaling: dict | None) -> None:
    rope = RotaryEmbedding(16, 256, 500000.0, scaling)
    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 255, 3, 3, 100, 17])
    q = torch.randn(6, 4, 16, generator=gen)
    k = torch.randn(6, 2, 16, generator=gen)
    rq, rk = rope(pos, q, k)
    inv = rope_inv_freq(16, 500000.0, scaling)
    torch.testing.assert_close(rq, _reference(q, pos, inv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk, _reference(k, pos, inv), atol=1e-5, rtol=1e-5)


def test_position_zero_is_identity_and_norms_are_kept() -> None:
    rope = RotaryEmbedding(8, 32, 10000.0)
    x = torch.randn(3, 2, 8)
    rq, _ = rope(torch.tensor([0, 7, 31]), x, x)
    torch.testing.assert_close(rq[0], x[0])
    torch.testing.assert_close(rq.norm(dim=-1), x.norm(dim=-1))


def test_llama3_scaling_bands() -> None:
    """Short wavelengths are kept, long ones slowed by ``factor``, the band between
    interpolated."""
    plain = rope_inv_freq(16, 500000.0)
    scaled = rope_inv_freq(16, 500000.0, LLAMA3)
    wavelen = 2 * math.pi / plain
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~high & ~low
    assert bool(((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all())


def test_cache_built_on_meta_can_be_recomputed() -> None:
    with torch.device("meta"):
        rope = RotaryEmbedding(8, 16, 10000.0)
    assert rope.cos_cache.is_meta
    rope.init_cache("cpu")
    assert rope.cos_cache.shape == (16, 4)
    assert not rope.cos_cache.is_meta
    assert "cos_cache" not in rope.state_dict()


def test_rmsnorm_computes_in_float32_and_casts_back() -> None:
    norm = RMSNorm(8, eps=1e-6, dtype=torch.bfloat16)
    x = (torch.randn(5, 8) * 30).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    want = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(y, want)
