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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.engine.layers.attention import paged_attention
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.layers.norm import RMSNorm
from lmfleet.engine.layers.quant import Fp8Linear
from lmfleet.engine.layers.rotary import RotaryEmbedding
from lmfleet.engine.layers.triton_fused import FusedOps
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
        #: q, k and v in one GEMM once :meth:`fuse_projections` ran
        self.qkv_proj: nn.Module | None = None
        self._qkv_sizes = (q_size, kv_size, kv_size)
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
        #: the backend's attention over a cache that already holds the step's K/V, when
        #: it has one: with fused ops, the q/k norm + rotary kernel then writes K/V
        #: (see ``set_attention_backend``)
        self.attend_fn: Callable[..., torch.Tensor] | None = None
        #: an fp8 KV cache's scales for this layer (see ``set_kv_scales``)
        self.k_scale = 1.0
        self.v_scale = 1.0
        #: fused q/k norm + rotary kernel when set (see ``set_fused_ops``)
        self.ops: FusedOps | None = None
        self.eps = cfg.rms_norm_eps

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            # views of one (T, q + 2 kv) output: rows keep its stride
            q, k, v = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(num_tokens, self.n_heads, self.head_dim)  # (T, n_heads, hd)
        k = k.view(num_tokens, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        v = v.view(num_tokens, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        rotary = self._rotary[0]
        ops = self.ops
        # what the fused q/k norm + rotary kernels take after q and k (and v)
        rope = (
            positions,
            rotary.cos_cache,
            rotary.sin_cache,
            None if self.q_norm is None else self.q_norm.weight,
            None if self.k_norm is None else self.k_norm.weight,
            self.eps,
        )
        if ops is not None and ops.qk_norm_rope_write_kv and self.attend_fn is not None:
            # one launch rotates q and k and stores k and v in their cache slots
            q = ops.qk_norm_rope_write_kv(
                q, k, v, *rope, kv_cache, meta.slot_mapping, self.k_scale, self.v_scale
            )  # (T, n_heads, hd)
            out = self.attend_fn(q, kv_cache, meta, self.scale, self.k_scale, self.v_scale)
            return self.o_proj(out.reshape(num_tokens, self.n_heads * self.head_dim))
        if ops is not None:  # (T, n_heads, hd), (T, n_kv, hd), new and contiguous
            q, k = ops.qk_norm_rope(q, k, *rope)
        else:
            if self.q_norm is not None and self.k_norm is not None:
                q = self.q_norm(q)
                k = self.k_norm(k)
            q, k = rotary(positions, q, k)
        out = self.attn_fn(
            q, k, v, kv_cache, meta, self.scale, self.k_scale, self.v_scale
        )  # (T, n_heads, hd)
        return self.o_proj(out.reshape(num_tokens, self.n_heads * self.head_dim))

    def fuse_projections(self) -> None:
        """Replace ``q_proj``, ``k_proj`` and ``v_proj`` by one ``qkv_proj`` (kept
        apart when only some of them hold fp8 weights)."""
        if self.qkv_proj is None:
            fused = _concat_linears(self.q_proj, self.k_proj, self.v_proj)
            if fused is not None:
                self.qkv_proj = fused
                del self.q_proj, self.k_proj, self.v_proj


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        #: gate and up in one GEMM once :meth:`fuse_projections` ran
        self.gate_up_proj: nn.Module | None = None
        #: the fused silu-and-multiply kernel when set (see ``set_fused_ops``)
        self.ops: FusedOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)  # (T, 2 I)
            if self.ops is not None:
                return self.down_proj(self.ops.silu_and_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """Replace ``gate_proj`` and ``up_proj`` by one ``gate_up_proj`` (kept apart
        when only one of them holds fp8 weights)."""
        if self.gate_up_proj is None:
            fused = _concat_linears(self.gate_proj, self.up_proj)
            if fused is not None:
                self.gate_up_proj = fused
                del self.gate_proj, self.up_proj


def _concat_linears(*linears: nn.Module) -> nn.Module | None:
    """One layer whose output is the given ones' outputs side by side, built from
    their weights (on their device and dtype; the originals can then be freed): a
    Linear from Linears, an :class:`Fp8Linear` from fp8 checkpoint layers, None for a
    mix of the two."""
    if all(isinstance(lin, Fp8Linear) for lin in linears):
        return Fp8Linear.concat(linears)  # type: ignore[arg-type]
    if not all(type(lin) is nn.Linear for lin in linears):
        return None
    first = linears[0]
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum out, in)
    fused = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=first.bias is not None,
        device="meta",
        dtype=weight.dtype,
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears])  # (sum out,)
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        #: fused norm kernels when set (see ``set_fused_ops``)
        self.ops: FusedOps | None = None

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer over the stream ``residual + x``, kept as two terms so that each
        residual add happens inside the next norm (one kernel with fused ops).
        ``residual`` is None at the first layer, whose ``x`` is the embeddings.
        Returns the MLP output and the residual stream before it (T, hidden) each."""
        if residual is None:
            residual = x
            h = norm_rows(self.input_layernorm, x, self.ops)
        else:
            h, residual = add_norm_rows(self.input_layernorm, x, residual, self.ops)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = add_norm_rows(self.post_attention_layernorm, h, residual, self.ops)
        return self.mlp(h), residual


def norm_rows(norm: RMSNorm, x: torch.Tensor, ops: FusedOps | None) -> torch.Tensor:
    """``norm(x)``, through the fused kernel when ``ops`` is set."""
    return norm(x) if ops is None else ops.rms_norm(x, norm.weight, norm.eps)


def add_norm_rows(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor, ops: FusedOps | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = residual + x`` and ``norm(r)``; returns ``(norm(r), r)``. The fused kernel
    writes ``r`` into ``residual``'s storage."""
    if ops is not None:
        return ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    residual = residual + x
    return norm(residual), residual


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
        self.ops: FusedOps | None = None
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Merge each layer's q/k/v projections into one GEMM and gate/up into
        another (fewer, larger matrix multiplies). Weights keep their values; the
        Hugging Face parameter names of those projections are gone afterwards, so
        load checkpoints before fusing."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def set_fused_ops(self, ops: FusedOps | None) -> None:
        """Run norms, residual adds, q/k norm + rotary and silu-and-multiply through
        ``ops`` (the Triton kernels: fewer launches), or the torch modules (None).
        silu-and-multiply needs :meth:`fuse_projections` first."""
        for layer in self.model.layers:
            layer.ops = layer.self_attn.ops = layer.mlp.ops = ops
        self.ops = ops

    def set_attention_backend(
        self,
        fn: Callable[..., torch.Tensor],
        attend_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        """Route every layer's attention through ``fn`` (same signature as
        :func:`~lmfleet.engine.layers.attention.paged_attention`: writes K/V, then
        attends). ``attend_fn`` (``(q, kv_cache, meta, scale, k_scale, v_scale)``, e.g.
        :func:`~lmfleet.engine.layers.triton_attention.triton_attend`) is the same
        backend's attention alone: with fused ops that can write the cache, layers then
        store K/V from their q/k norm + rotary kernel and call it instead of ``fn``."""
        for layer in self.model.layers:
            layer.self_attn.attn_fn = fn
            layer.self_attn.attend_fn = attend_fn

    def set_kv_scales(self, k: Sequence[float], v: Sequence[float]) -> None:
        """Each layer's fp8 KV-cache scales (1.0 for a cache in the model dtype); plain
        floats, read when a forward runs or a CUDA graph is captured."""
        layers = self.model.layers
        if len(k) != len(layers) or len(v) != len(layers):
            raise ValueError(f"{len(k)} K and {len(v)} V scales for {len(layers)} layers")
        for layer, k_scale, v_scale in zip(layers, k, v, strict=True):
            layer.self_attn.k_scale = float(k_scale)
            layer.self_attn.v_scale = float(v_scale)

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
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        if residual is None:  # no layers
            return norm_rows(self.model.norm, x, self.ops)
        return add_norm_rows(self.model.norm, x, residual, self.ops)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (N, vocab) in float32 for hidden states (N, hidden)."""
        return self.lm_head(hidden).float()
