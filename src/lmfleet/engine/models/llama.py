"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5 and Qwen3.

One flat batch of tokens from many sequences goes through the layers together;
attention reads and writes the paged KV cache through
:func:`~lmfleet.engine.layers.attention.paged_attention`. Parameter names match the
Hugging Face checkpoints, so a state dict loads as is. The differences between the
families are flags of :class:`ArchConfig`: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3), Llama 3 rotary scaling, tied embeddings. This module knows nothing about
files, scheduling or sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.engine.layers.attention import paged_attention
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.layers.norm import RMSNorm
from lmfleet.engine.layers.rotary import RotaryEmbedding
from lmfleet.engine.models.config import ArchConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # shared by all layers; a plain attribute so it is neither a submodule here
        # nor part of this layer's state dict
        self._rotary = (rotary,)
        #: the paged-attention backend (CPU reference or Triton), same signature
        self.attn_fn = paged_attention

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.n_heads, self.head_dim)  # (T, n_heads, hd)
        k = self.k_proj(x).view(num_tokens, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        v = self.v_proj(x).view(num_tokens, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self._rotary[0](positions, q, k)
        out = self.attn_fn(q, k, v, kv_cache, meta, self.scale)  # (T, n_heads, hd)
        return self.o_proj(out.reshape(num_tokens, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder over the paged KV cache.

    ``max_positions`` bounds the rotary tables (default: the checkpoint's
    ``max_position_embeddings``); pass the served ``max_model_len`` to save memory
    on long-context checkpoints. Build it under ``torch.device("meta")`` and let the
    loader assign the weights; :meth:`init_buffers` then fills the rotary tables.
    """

    def __init__(self, cfg: ArchConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(
            cfg.head_dim,
            max_positions or cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.model = LlamaModel(cfg, self.rotary)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, fn: Callable[..., torch.Tensor]) -> None:
        """Route every layer's attention through ``fn`` (same signature as
        :func:`~lmfleet.engine.layers.attention.paged_attention`)."""
        for layer in self.model.layers:
            layer.self_attn.attn_fn = fn

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute the non-persistent buffers (rotary tables) on ``device``."""
        self.rotary.init_cache(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Run ``input_ids`` (T,) at ``positions`` (T,); returns hidden states (T, hidden).

        ``kv_caches[i]`` is layer ``i``'s (2, num_blocks, block_size, n_kv, hd) cache;
        the new tokens' keys and values are written into it.
        """
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(
                f"expected {len(self.model.layers)} KV caches, one per layer, got {len(kv_caches)}"
            )
        x = self.model.embed_tokens(input_ids)  # (T, hidden)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, positions, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) in float32 for hidden states (N, hidden)."""
        return self.lm_head(hidden).float()
