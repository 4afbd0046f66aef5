"""Rotary position embeddings in the rotate-half (GPT-NeoX / Hugging Face Llama) layout.

The cos/sin tables are precomputed in float32 for every position up to
``max_positions`` and gathered at each token's absolute position, so one flat batch
can mix tokens of many sequences at different positions. Supports the plain
schedule and Llama 3's frequency scaling. Knows nothing about the KV cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``(head_dim // 2,)`` float32, with Llama 3 scaling if asked."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim // 2,)
    if scaling is None:
        return inv_freq
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between
    # interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (T, n_heads, head_dim) by per-token angles given as half-width
    ``cos``/``sin`` (T, 1, head_dim // 2) in ``x``'s dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (T, n_heads, head_dim // 2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to queries and keys at given absolute positions.

    The tables are non-persistent buffers: a model built on the ``meta`` device
    calls :meth:`init_cache` once its weights are loaded.
    """

    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos_cache", torch.empty(0, device=device), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0, device=device), persistent=False)
        self.init_cache(device)

    def init_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables on ``device``."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, device=device)
        pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # (max_positions, head_dim // 2)
        self.cos_cache = freqs.cos()
        self.sin_cache = freqs.sin()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` (T, n_heads, hd) and ``k`` (T, n_kv_heads, hd) at ``positions`` (T,)."""
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, hd // 2)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, hd // 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
