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
"""

from __future__ import annotations

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


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``k``/``v`` (T, n_kv, hd) at flat slots ``slot_mapping`` (T,) of
    ``kv_cache`` (2, num_blocks, block_size, n_kv, hd)."""
    n_kv, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, n_kv, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write ``k``/``v`` into ``kv_cache`` and attend; returns (T, n_heads, hd).

    ``q`` is (T, n_heads, hd), ``k`` and ``v`` (T, n_kv, hd) with ``n_heads`` a
    multiple of ``n_kv`` (grouped-query attention). ``kv_cache`` is one layer's
    (2, num_blocks, block_size, n_kv, hd) cache and is updated in place.
    """
    write_kv(k, v, kv_cache, meta.slot_mapping)
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
            q[start:end], k[start:end], v[start:end], kv_cache, meta, i, scale
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
) -> torch.Tensor:
    """Attention for sequence ``i``'s ``q`` (L, n_heads, hd); returns (L, n_heads, hd)."""
    q_len = q.shape[0]
    seq_len = meta.seq_lens_cpu[i]
    n_kv, head_dim = kv_cache.shape[-2:]
    if q_len == seq_len:
        # the whole context is new: use it directly, no need to read the cache back
        keys, values = k_new, v_new  # (S, n_kv, hd)
    else:
        num_blocks = -(-seq_len // meta.block_size)
        blocks = meta.block_tables[i, :num_blocks].long()  # (nb,)
        kv = kv_cache[:, blocks].view(2, num_blocks * meta.block_size, n_kv, head_dim)
        keys, values = kv[0, :seq_len], kv[1, :seq_len]  # (S, n_kv, hd)
    qh = q.transpose(0, 1)  # (n_heads, L, hd)
    kh = keys.transpose(0, 1)  # (n_kv, S, hd)
    vh = values.transpose(0, 1)  # (n_kv, S, hd)
    gqa = qh.shape[0] != n_kv
    if q_len == seq_len:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)  # (L,)
        k_pos = torch.arange(seq_len, device=q.device)  # (S,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (L, S)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)  # (L, n_heads, hd)


def _attend_decode_batched(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    block_size: int,
    scale: float,
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
    bytes_per_seq = 2 * span * n_kv * head_dim * kv_cache.element_size()
    step = max(1, DECODE_GATHER_BYTES // bytes_per_seq)
    out = torch.empty_like(qg)  # (B, n_kv, group, hd)
    for start in range(0, batch, step):
        end = min(start + step, batch)
        kv = flat.index_select(1, slots[start:end].reshape(-1))  # (2, b * S, n_kv, hd)
        kv = kv.view(2, end - start, span, n_kv, head_dim).transpose(2, 3)  # (2, b, n_kv, S, hd)
        out[start:end] = F.scaled_dot_product_attention(
            qg[start:end], kv[0], kv[1], attn_mask=mask[start:end], scale=scale
        )
    return out.view(batch, n_heads, head_dim)
