"""Causal attention over the paged KV cache, in plain PyTorch (the CPU backend).

:func:`paged_attention` stores one layer's new keys and values in the cache, then
lets every sequence's new queries attend to its whole context read back from its
blocks. Prefill from position 0, chunked prefill, prefix-cache hits, decode and
mixed batches all follow from one rule: query ``j`` of a sequence with ``q_len`` new
tokens and ``seq_len`` tokens of context sits at position ``seq_len - q_len + j`` and
sees keys at positions up to and including its own.

It is a pure function of tensors and :class:`AttentionMetadata`, so an accelerator
backend (Triton kernels) can replace it behind the same signature. It knows nothing
about models, block allocation or scheduling.

The cache may be stored in float8 e4m3 (``--kv-cache-dtype fp8``) while queries stay
in the model dtype. Each layer has two per-tensor scales, ``k_scale`` and ``v_scale``
(1.0 unless the checkpoint or a calibration gives others, see
:mod:`lmfleet.engine.kv_scales`): a key is stored as ``fp8(clamp(k / k_scale, +-448))``
and stands for ``stored * k_scale``. Every read goes through that rounding, including
a prefill's own new keys, so all backends see the same values. This reference
dequantizes explicitly (``(stored * scale).to(q.dtype)``); the Triton kernels fold the
scales into the softmax scale and the output instead, the same values up to rounding.
Caches in the model dtype take no scales (both must be 1.0).
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

from lmfleet.engine.layers.attention_metadata import AttentionMetadata

#: below this many single-token queries in a step, the per-sequence loop is used for
#: them too (the batched path pays for padding every sequence to the longest one)
BATCHED_DECODE_MIN_SEQS = 2
#: the batched decode path gathers about this many bytes of K and V at a time. On a
#: 2-core CPU, 2-4 MiB gathers ran 1.5-3x faster than gathering the whole batch at
#: once (which allocates fresh pages on every call and spills the caches)
DECODE_GATHER_BYTES = 4 << 20
#: the float8 KV cache format and its largest finite value (scale 1.0: stored = value)
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of a ``kv_cache_dtype`` setting: ``"auto"`` is the model's."""
    if name == "auto":
        return model_dtype
    if name == "fp8":
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {name!r}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def inverse_scale(scale: float) -> float:
    """``1 / scale`` rounded to fp32: what an fp8 write multiplies by. Every backend
    multiplies by this same fp32 number, so they store the same bytes. Called per
    layer per step, so no tensor is made for it (``struct`` rounds to nearest)."""
    return struct.unpack("f", struct.pack("f", 1.0 / scale))[0]


def to_fp8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Saturating cast of ``x / scale`` to the fp8 KV format; NaN stays NaN. The
    quotient is ``x * inverse_scale(scale)`` in fp32 (nothing for ``scale == 1.0``:
    bf16 inputs round straight to fp8)."""
    if scale != 1.0:
        x = x.float() * inverse_scale(scale)
    return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def from_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The values fp8 ``x`` stands for, ``x * scale``, rounded once to ``dtype``."""
    if scale == 1.0:
        return x.to(dtype)  # e4m3 values are exact in every float dtype
    return (x.float() * scale).to(dtype)


def check_kv_scales(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Scales must be finite and positive, and 1.0 for a cache that is not fp8."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (0.0 < value < float("inf")):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not is_fp8(kv_cache.dtype) and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(
            f"KV scales apply to an fp8 cache only; a {kv_cache.dtype} cache got "
            f"k_scale={k_scale}, v_scale={v_scale}"
        )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store ``k``/``v`` (T, n_kv, hd) at flat slots ``slot_mapping`` (T,) of
    ``kv_cache`` (2, num_blocks, block_size, n_kv, hd); an fp8 cache stores
    ``to_fp8(k, k_scale)`` and ``to_fp8(v, v_scale)``."""
    check_kv_scales(kv_cache, k_scale, v_scale)
    n_kv, head_dim = kv_cache.shape[-2:]
    if is_fp8(kv_cache.dtype):
        # index_copy_ has no float8 kernel on CPU: copy the bytes through uint8 views
        kv_u8 = kv_cache.view(torch.uint8)
        k8, v8 = to_fp8(k, k_scale).view(torch.uint8), to_fp8(v, v_scale).view(torch.uint8)
        kv_u8[0].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, k8)
        kv_u8[1].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, v8)
        return
    kv_cache[0].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Write ``k``/``v`` into ``kv_cache`` and attend; returns (T, n_heads, hd).

    ``q`` is (T, n_heads, hd), ``k`` and ``v`` (T, n_kv, hd) with ``n_heads`` a
    multiple of ``n_kv`` (grouped-query attention). ``kv_cache`` is one layer's
    (2, num_blocks, block_size, n_kv, hd) cache and is updated in place.
    ``k_scale``/``v_scale`` are an fp8 cache's per-tensor scales (module docstring).
    """
    write_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
    scales = (k_scale, v_scale)
    out = torch.empty_like(q)  # (T, n_heads, hd)
    qsl = meta.query_start_loc_cpu
    q_lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    if len(decodes) < BATCHED_DECODE_MIN_SEQS:
        decodes = []
    decode_set = set(decodes)
    for i in range(meta.num_seqs):
        if i in decode_set or q_lens[i] == 0:
            continue
        start, end = qsl[i], qsl[i + 1]
        out[start:end] = _attend_one(
            q[start:end], k[start:end], v[start:end], kv_cache, meta, i, scale, scales
        )
    if decodes:
        if len(decodes) == meta.num_seqs and q.shape[0] == meta.num_seqs:
            # a pure decode step: token i belongs to sequence i
            out.copy_(
                _attend_decode_batched(
                    q,
                    kv_cache,
                    meta.block_tables,
                    meta.seq_lens,
                    meta.max_seq_len,
                    meta.block_size,
                    scale,
                    scales,
                )
            )
        else:
            seq_idx = torch.tensor(decodes, device=q.device)  # (D,)
            tok_idx = torch.tensor([qsl[i] for i in decodes], device=q.device)  # (D,)
            max_len = max(meta.seq_lens_cpu[i] for i in decodes)
            dec_out = _attend_decode_batched(
                q.index_select(0, tok_idx),
                kv_cache,
                meta.block_tables.index_select(0, seq_idx),
                meta.seq_lens.index_select(0, seq_idx),
                max_len,
                meta.block_size,
                scale,
                scales,
            )
            out.index_copy_(0, tok_idx, dec_out)
    return out


def _attend_one(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    i: int,
    scale: float,
    kv_scales: tuple[float, float],
) -> torch.Tensor:
    """Attention for sequence ``i``'s ``q`` (L, n_heads, hd); returns (L, n_heads, hd)."""
    q_len = q.shape[0]
    seq_len = meta.seq_lens_cpu[i]
    n_kv, head_dim = kv_cache.shape[-2:]
    fp8 = is_fp8(kv_cache.dtype)
    if q_len == seq_len:
        # the whole context is new: use it directly, no need to read the cache back
        keys, values = k_new, v_new  # (S, n_kv, hd)
        if fp8:  # ... but as rounded into the cache, like every later read of it
            keys, values = to_fp8(keys, kv_scales[0]), to_fp8(values, kv_scales[1])
    else:
        num_blocks = -(-seq_len // meta.block_size)
        blocks = meta.block_tables[i, :num_blocks].long()  # (nb,)
        kv = kv_cache[:, blocks].view(2, num_blocks * meta.block_size, n_kv, head_dim)
        keys, values = kv[0, :seq_len], kv[1, :seq_len]  # (S, n_kv, hd)
    if fp8:
        keys = from_fp8(keys, kv_scales[0], q.dtype)
        values = from_fp8(values, kv_scales[1], q.dtype)
    elif keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    qh = q.transpose(0, 1)  # (n_heads, L, hd)
    kh = keys.transpose(0, 1)  # (n_kv, S, hd)
    vh = values.transpose(0, 1)  # (n_kv, S, hd)
    n_heads = qh.shape[0]
    group = n_heads // n_kv
    # Grouped heads as a broadcast view, not sdpa's enable_gqa: on CPU, enable_gqa is
    # 4-5x slower than this (SmolLM2, 9 heads over 3, 400-token prefill) and a copy
    # of K/V per query head costs memory for nothing.
    qg = qh.view(n_kv, group, q_len, head_dim)  # (n_kv, group, L, hd)
    kg = kh[:, None].expand(n_kv, group, seq_len, head_dim)  # (n_kv, group, S, hd)
    vg = vh[:, None].expand(n_kv, group, seq_len, head_dim)  # (n_kv, group, S, hd)
    if q_len == seq_len:
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # (L,)
        k_pos = torch.arange(seq_len, device=q.device)  # (S,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (L, S)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    return o.reshape(n_heads, q_len, head_dim).transpose(0, 1)  # (L, n_heads, hd)


def _attend_decode_batched(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    block_size: int,
    scale: float,
    kv_scales: tuple[float, float],
) -> torch.Tensor:
    """One query per sequence: ``q`` (B, n_heads, hd) over each sequence's whole
    context, gathered token by token through the padded ``block_tables``
    (B, max_blocks) and masked by ``seq_lens`` (B,). Returns (B, n_heads, hd)."""
    batch, n_heads, head_dim = q.shape
    n_kv = kv_cache.shape[-2]
    span = max_seq_len
    flat = kv_cache.view(2, -1, n_kv, head_dim)  # (2, num_slots, n_kv, hd)
    k_pos = torch.arange(span, device=q.device)  # (S,)
    valid = k_pos[None, :] < seq_lens[:, None]  # (B, S)
    # positions past a sequence's end read its last token instead of stale or
    # uninitialised slots (a NaN there would survive the mask as 0 * NaN)
    pos = torch.minimum(k_pos[None, :], seq_lens[:, None] - 1)  # (B, S)
    blocks = block_tables.long().gather(1, pos // block_size)  # (B, S)
    slots = blocks * block_size + pos % block_size  # (B, S)
    mask = valid.view(batch, 1, 1, span)  # (B, 1, 1, S)
    qg = q.view(batch, n_kv, n_heads // n_kv, head_dim)  # (B, n_kv, group, hd)
    # an fp8 gather is upcast to q's dtype, so size the chunks by the larger copy
    elem = max(kv_cache.element_size(), q.element_size())
    bytes_per_seq = 2 * span * n_kv * head_dim * elem
    step = max(1, DECODE_GATHER_BYTES // bytes_per_seq)
    out = torch.empty_like(qg)  # (B, n_kv, group, hd)
    for start in range(0, batch, step):
        end = min(start + step, batch)
        kv = flat.index_select(1, slots[start:end].reshape(-1))  # (2, b * S, n_kv, hd)
        if kv_scales != (1.0, 1.0):
            kv = torch.stack(
                (from_fp8(kv[0], kv_scales[0], q.dtype), from_fp8(kv[1], kv_scales[1], q.dtype))
            )
        elif kv.dtype != q.dtype:
            kv = kv.to(q.dtype)
        kv = kv.view(2, end - start, span, n_kv, head_dim).transpose(2, 3)  # (2, b, n_kv, S, hd)
        out[start:end] = F.scaled_dot_product_attention(
            qg[start:end], kv[0], kv[1], attn_mask=mask[start:end], scale=scale
        )
    return out.view(batch, n_heads, head_dim)
