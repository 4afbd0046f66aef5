"""Split-K ("flash-decoding") paged attention for decode-only steps, in Triton.

At small batches the varlen kernel of :mod:`~lmfleet.engine.layers.triton_attention`
launches one program per (query block, KV head), so a decode step at batch 1 runs
``n_kv`` programs that each walk the whole context serially and leave most of the
GPU idle. Here the context of every (sequence, KV head) is cut into ``num_splits``
ranges, one program each, and two launches do the work:

- ``_decode_split_kernel``, grid ``(B, n_kv, num_splits)``: the program for split
  ``s`` of sequence ``b`` covers keys ``[s * span, min((s + 1) * span, seq_len))``
  with ``span = ceil(seq_len / num_splits)`` rounded up to the key tile. It takes
  all ``group = n_heads // n_kv`` query heads of its KV head as rows of one tile
  (padded to at least 16 rows for ``tl.dot``), runs a base-2 online softmax over its
  range and writes the partial running max ``m``, sum ``l`` and unnormalised output
  ``acc`` in fp32. A split past the end of its sequence writes ``m = -1e30``,
  ``l = 0``, ``acc = 0``.
- ``_decode_combine_kernel``, grid ``(B, n_heads)``: merges the splits with
  log-sum-exp weights, ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``.
  With ``num_splits == 1`` (large batches) the first kernel normalises and writes
  the output itself, and this launch and the partial buffers are skipped.

The spans are computed on the device from ``meta.seq_lens``; the host reads no
sequence length, so the launch depends only on the batch size and is CUDA-graph
capturable. :func:`decode_num_splits` picks the split count from the batch size,
the KV head count and the SM count alone for the same reason. A row with
``seq_len == 0`` (CUDA-graph padding) reads nothing from the cache and gets zeros.

K and V may be stored as float32, bfloat16, float16 or float8_e4m3fn: they are
converted to the query's dtype after loading, and the softmax weights P are rounded
to the query's dtype (never to fp8) before the P @ V product. An fp8 cache's
``k_scale`` is folded into the softmax scale and its ``v_scale`` into the final
normalisation (the split kernel's with one split, the combine kernel's otherwise).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lmfleet.engine.layers.attention import check_kv_scales
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.layers.triton_attention import (
    _interpreting,
    import_triton,
)

#: the softmax runs in base 2: exp(x) = exp2(x * log2(e))
_LOG2E = 1.4426950408889634
#: aim for about this many waves of programs over the SMs
_TARGET_WAVES = 2
#: SM count assumed when there is no CUDA device (interpreter runs on CPU)
_CPU_NUM_SMS = 8
#: cache dtypes the kernel reads
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def decode_num_splits(num_seqs: int, n_kv: int, num_sms: int, max_splits: int = 16) -> int:
    """How many ranges to split each (sequence, KV head)'s context into.

    Enough that ``num_seqs * n_kv * splits`` programs make about two waves over
    ``num_sms`` SMs, at most ``max_splits``; 1 once ``num_seqs * n_kv`` alone fills
    the SMs. A pure function of its arguments (no sequence lengths), so a CUDA graph
    captured for a batch size keeps a valid grid.
    """
    if num_sms < 1 or max_splits < 1:
        raise ValueError(f"num_sms and max_splits must be >= 1, got {num_sms}, {max_splits}")
    programs = num_seqs * n_kv
    if programs <= 0 or programs >= num_sms:
        return 1
    target = _TARGET_WAVES * num_sms
    return max(1, min(max_splits, -(-target // programs)))


def decode_splits_for(num_seqs: int, n_kv: int, device: torch.device) -> int:
    """:func:`decode_num_splits` with ``device``'s SM count (8 on CPU)."""
    return decode_num_splits(num_seqs, n_kv, _num_sms(device))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _kernels() -> dict[str, Any]:
    """Compile-on-first-use kernels, built once; raises ``TritonUnavailable``."""
    triton, tl = import_triton("the Triton decode attention kernel")

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        cache_ptr,
        m_ptr,  # (B, n_heads, S) fp32 partial running max (base-2 units)
        l_ptr,  # (B, n_heads, S) fp32 partial sum of exp2
        acc_ptr,  # (B, n_heads, S, HEAD_DIM) fp32 partial unnormalised output
        out_ptr,  # (B, n_heads, HEAD_DIM): written here directly when NUM_SPLITS == 1
        block_tables_ptr,
        seq_lens_ptr,
        qk_scale,  # softmax scale * log2(e) * k_scale
        v_scale,  # multiplies the output (1.0 unless the cache is fp8)
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_bt,
        cache_kv_stride,
        cache_block_stride,
        cache_pos_stride,
        cache_head_stride,
        GROUP: tl.constexpr,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
        BLOCK_M: tl.constexpr,  # rows: GROUP heads padded to a power of 2 >= 16
        TILE_N: tl.constexpr,  # keys per inner iteration
        NUM_SPLITS: tl.constexpr,
        IEEE: tl.constexpr,  # exact fp32 products (fp32 queries)
        UPCAST: tl.constexpr,  # products in fp32 (the interpreter cannot multiply bf16)
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        # ceil(seq_len / NUM_SPLITS) rounded up to whole tiles (tl.cdiv spelled out: a
        # nested jit call is slow in the interpreter)
        span = ((seq_len + NUM_SPLITS - 1) // NUM_SPLITS + TILE_N - 1) // TILE_N * TILE_N
        start = split * span
        end = tl.minimum(start + span, seq_len)

        rows = tl.arange(0, BLOCK_M)  # (M,)
        head = kv_head * GROUP + rows  # (M,) query head of each row
        row_ok = rows < GROUP
        d = tl.arange(0, DIM_PAD)  # (D,)
        d_ok = d < HEAD_DIM

        q_off = seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)

        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head.to(tl.int64) * cache_head_stride
        # empty when the split starts at or past the end (and for seq_len == 0)
        for n0 in range(start, end, TILE_N):
            k_pos = n0 + tl.arange(0, TILE_N)  # (N,)
            k_ok = k_pos < end
            blk = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            slot_off = blk * cache_block_stride + (k_pos % BLOCK_SIZE) * cache_pos_stride
            kv_off = slot_off[:, None] + head_off + d[None, :]  # (N, D)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            # masked slots read as 0, so stale or poisoned cache slots never enter
            k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # (N, D)
            v = tl.load(cache_ptr + cache_kv_stride + kv_off, mask=kv_mask, other=0.0)
            v = v.to(q.dtype)

            kt = tl.trans(k)
            s = tl.dot(q, kt, input_precision="ieee") if IEEE else tl.dot(q, kt)  # (M, N)
            s = s * qk_scale
            s = tl.where(k_ok[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])  # (M, N)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            # P is rounded to the query's dtype (not the cache's: fp8 would be too coarse)
            p = p.to(q_ptr.dtype.element_ty).to(q.dtype)
            if IEEE:
                acc += tl.dot(p, v, input_precision="ieee")
            else:
                acc += tl.dot(p, v)
            m_i = m_new

        if NUM_SPLITS == 1:
            # nothing to combine: normalise and write the output (seq_len 0 gives zeros)
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_i[:, None] * v_scale
            o_off = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(
                out_ptr + o_off,
                out.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )
        else:
            part = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
            tl.store(m_ptr + part, m_i, mask=row_ok)
            tl.store(l_ptr + part, l_i, mask=row_ok)
            acc_off = part[:, None] * HEAD_DIM + d[None, :]
            tl.store(acc_ptr + acc_off, acc, mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        v_scale,
        stride_ot,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS_PAD)  # (S,)
        sp_ok = sp < NUM_SPLITS
        d = tl.arange(0, DIM_PAD)  # (D,)
        d_ok = d < HEAD_DIM

        base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
        m = tl.load(m_ptr + base + sp, mask=sp_ok, other=-1.0e30)  # (S,)
        l_s = tl.load(l_ptr + base + sp, mask=sp_ok, other=0.0)  # (S,)
        acc_off = (base + sp)[:, None] * HEAD_DIM + d[None, :]
        acc = tl.load(acc_ptr + acc_off, mask=sp_ok[:, None] & d_ok[None, :], other=0.0)

        # empty splits have l = 0 and acc = 0, so whatever weight they get adds nothing
        w = tl.exp2(m - tl.max(m, axis=0))  # (S,)
        total = tl.sum(w * l_s, axis=0)
        total = tl.where(total == 0.0, 1.0, total)  # seq_len 0: zeros, not NaN
        out = tl.sum(w[:, None] * acc, axis=0) / total * v_scale  # (D,)
        o_off = seq.to(tl.int64) * stride_ot + head * stride_oh + d
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return {
        "split": _decode_split_kernel,
        "combine": _decode_combine_kernel,
        "next_power_of_2": triton.next_power_of_2,
    }


def triton_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention with the context split across programs; returns (B, n_heads, hd).

    ``q`` is (B, n_heads, hd), one new token per sequence (token ``i`` belongs to
    sequence ``i``); ``kv_cache`` is one layer's (2, num_blocks, block_size, n_kv, hd)
    cache of float32, bfloat16, float16 or float8_e4m3fn, already holding this step's
    keys and values (``k_scale``/``v_scale``: an fp8 cache's scales). Reads only
    ``meta.seq_lens`` and ``meta.block_tables`` (on the device), so it can be captured
    in a CUDA graph. ``num_splits`` defaults to :func:`decode_num_splits` for the
    device's SM count. Raises
    :class:`TritonUnavailable` when Triton is missing.
    """
    kern = _kernels()
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be (2, num_blocks, block_size, n_kv, head_dim), got "
            f"{tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")
    if kv_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"unsupported kv_cache dtype {kv_cache.dtype}")
    check_kv_scales(kv_cache, k_scale, v_scale)
    if q.dim() != 3:
        raise ValueError(f"q must be (num_seqs, n_heads, head_dim), got {tuple(q.shape)}")
    num_seqs, n_heads, head_dim = q.shape
    n_kv = kv_cache.shape[3]
    if num_seqs != meta.seq_lens.shape[0]:
        raise ValueError(
            f"decode attention takes one query per sequence: {num_seqs} queries for "
            f"{meta.seq_lens.shape[0]} sequences"
        )
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads is not a multiple of {n_kv} KV heads")
    if kv_cache.shape[-1] != head_dim or kv_cache.shape[2] != meta.block_size:
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} does not match head_dim {head_dim} "
            f"and block_size {meta.block_size}"
        )
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported query dtype {q.dtype}")
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, n_kv, _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    out = torch.empty(num_seqs, n_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if num_splits == 1:
        # the split kernel writes ``out`` itself; the partial pointers go unused
        part_m = part_l = part_acc = out
    else:
        part_m = torch.empty(num_seqs, n_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(
            num_seqs, n_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )

    nxt = kern["next_power_of_2"]
    group = n_heads // n_kv
    dim_pad = max(nxt(head_dim), 16)
    tables = meta.block_tables
    kern["split"][(num_seqs, n_kv, num_splits)](
        q,
        kv_cache,
        part_m,
        part_l,
        part_acc,
        out,
        tables,
        meta.seq_lens,
        scale * _LOG2E * k_scale,
        v_scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        GROUP=group,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=meta.block_size,
        BLOCK_M=max(16, nxt(group)),
        TILE_N=32 if meta.block_size <= 16 else 64,
        NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32,
        UPCAST=_interpreting() and q.dtype != torch.float32,
        num_warps=4,
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    if num_splits == 1:
        return out
    kern["combine"][(num_seqs, n_heads)](
        part_m,
        part_l,
        part_acc,
        out,
        v_scale,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        NUM_SPLITS=num_splits,
        SPLITS_PAD=nxt(num_splits),
        num_warps=1 if head_dim <= 64 else 2,
        enable_fp_fusion=True,
    )
    return out


__all__ = [
    "decode_num_splits",
    "decode_splits_for",
    "triton_decode_attention",
]
