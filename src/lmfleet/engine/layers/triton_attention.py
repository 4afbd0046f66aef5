"""Paged attention in Triton kernels (the CUDA backend).

:func:`triton_paged_attention` has the signature and meaning of
:func:`~lmfleet.engine.layers.attention.paged_attention`: it stores one layer's new
keys and values in the paged cache, then every sequence's new queries attend to its
whole context, reading K/V in place through the block table. Two launches per layer
(:func:`triton_attend` is the second alone, for a cache that the fused q/k norm +
rotary kernel of ``triton_fused`` has already written, which is how the runner uses
it):

- ``_write_kv_kernel``: one program per new token copies its K and V rows to slot
  ``slot_mapping[t]`` (a negative slot is padding and is skipped).
- ``_paged_attention_kernel``: one kernel for prefill from 0, chunked prefill over a
  cached prefix, decode and mixed batches (varlen queries over paged KV, causal with
  an offset). A program takes ``BLOCK_Q`` consecutive query tokens of one sequence and
  all ``group`` query heads of one KV head (``BLOCK_M = BLOCK_Q * group`` rows), walks
  the context in tiles of ``TILE_N`` keys gathered through the block table, and keeps
  an fp32 online softmax. The grid is ``(T // BLOCK_Q + B, n_kv)``: sequence ``i``'s
  query blocks start at index ``query_start_loc[i] // BLOCK_Q + i``, an upper bound
  that needs no host-side bookkeeping; each program finds its sequence by binary
  search, and programs past a sequence's last query block return at once.

With a float8 e4m3 cache (``--kv-cache-dtype fp8``) the write kernel multiplies K/V
by the fp32 inverse of the layer's ``k_scale``/``v_scale``, saturates them to +-448
and rounds them on store; the attention kernel loads fp8 tiles, converts them to the
query dtype before the products and rounds P to the query dtype. The scales cost
nothing there: ``k_scale`` is folded into the softmax scale and ``v_scale`` into the
final normalisation. The compiled kernels need compute capability 8.9+ for fp8.

Triton is imported lazily: this module imports without it (CPU CI), and the
functions raise :class:`TritonUnavailable` only when called. With
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from lmfleet.engine.layers.attention import FP8_KV_MAX, check_kv_scales, inverse_scale, is_fp8
from lmfleet.engine.layers.attention_metadata import AttentionMetadata

#: the softmax runs in base 2: exp(x) = exp2(x * log2(e))
_LOG2E = 1.4426950408889634
#: the running max starts finite, so rows that see no key give exp2(-inf) = 0, not NaN
_NEG_INIT = -1.0e30

#: the fp8 rounding helper the kernels call, set by :func:`_kernels` (a module global:
#: jitted functions resolve callees through their globals); the fused kernels of
#: ``triton_fused`` call it too
_fp8_grid: Any = None


class TritonUnavailable(RuntimeError):
    """Triton is not installed or cannot run here; not recoverable in this process.
    Install ``triton`` (it ships with CUDA builds of PyTorch) or use the CPU backend
    :func:`lmfleet.engine.layers.attention.paged_attention`."""


def triton_available() -> bool:
    """Whether the Triton kernels can run: Triton imports and either a CUDA device
    is present or ``TRITON_INTERPRET=1`` asks for the CPU interpreter."""
    try:
        _kernels()
    except TritonUnavailable:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def import_triton(what: str) -> tuple[Any, Any]:
    """``triton`` and ``triton.language``, or :class:`TritonUnavailable` saying that
    ``what`` needs them."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TritonUnavailable(
            f"{what} needs the 'triton' package ({exc}); install it or run on the CPU "
            "(torch) backend"
        ) from exc
    return triton, tl


@functools.cache
def _kernels() -> dict[str, Any]:
    """Compile-on-first-use kernels, built once; raises ``TritonUnavailable``."""
    triton, tl = import_triton("the Triton attention backend")
    global _fp8_grid

    def _fp8_grid_impl(x, FP8_MAX: tl.constexpr):
        """fp32 ``x`` saturated to +-FP8_MAX (NaN stays NaN) and rounded to the nearest
        e4m3 value (ties to even), returned as fp32, so that the cast to float8 that
        follows is exact on every backend and stores the bytes of torch's cast (the
        interpreter's own fp8 cast truncates subnormals and rounds ties away from
        zero). The fp32 adder does the rounding: adding 2^23 ulps of the e4m3 spacing
        at |x| (2^-9 below 2^-6) drops the bits below that spacing."""
        x = tl.maximum(x, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        x = tl.minimum(x, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        bits = x.to(tl.int32, bitcast=True)
        # biased exponent of 2^23 e4m3 spacings: fp32 exponent - 3 mantissa bits + 23
        magic = ((tl.maximum((bits >> 23) & 0xFF, 121) + 20) << 23).to(tl.float32, bitcast=True)
        mag = (tl.abs(x) + magic) - magic
        return tl.where(bits < 0, -mag, mag)  # the sign bit: -0 stays -0

    # a plain function in the interpreter, where a jitted callee would re-patch the
    # language on every call (see triton_fused._round_to)
    _fp8_grid = _fp8_grid_impl if _interpreting() else triton.jit(_fp8_grid_impl)

    @triton.jit
    def _write_kv_kernel(
        k_ptr,
        v_ptr,
        cache_ptr,
        slot_ptr,
        k_inv_scale,  # fp32 1 / k_scale (fp8 caches only)
        v_inv_scale,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        cache_kv_stride,
        cache_slot_stride,
        cache_head_stride,
        N_KV: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        DIM_PAD: tl.constexpr,
        FP8_MAX: tl.constexpr,  # > 0: saturate to +-FP8_MAX before the cast to fp8
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, HEADS_PAD)[:, None]  # (HEADS_PAD, 1)
            d = tl.arange(0, DIM_PAD)[None, :]  # (1, DIM_PAD)
            mask = (h < N_KV) & (d < HEAD_DIM)
            k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
            if FP8_MAX > 0:  # scale in fp32 (exact for bf16/fp16 inputs), then round
                k = _fp8_grid(k.to(tl.float32) * k_inv_scale, FP8_MAX)
                v = _fp8_grid(v.to(tl.float32) * v_inv_scale, FP8_MAX)
            dst = cache_ptr + slot * cache_slot_stride + h * cache_head_stride + d
            tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + cache_kv_stride, v.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _paged_attention_kernel(
        q_ptr,
        cache_ptr,
        out_ptr,
        block_tables_ptr,
        seq_lens_ptr,
        query_start_loc_ptr,
        qk_scale,  # softmax scale * log2(e) * k_scale
        v_scale,  # multiplies the output (1.0 unless the cache is fp8)
        num_seqs,
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
        BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x GROUP heads
        BLOCK_Q: tl.constexpr,
        TILE_N: tl.constexpr,  # keys per inner iteration
        IEEE: tl.constexpr,  # exact fp32 products (fp32 inputs), else the tensor-core default
        UPCAST: tl.constexpr,  # products in fp32 (the interpreter cannot multiply bf16)
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)

        # binary search: the last sequence whose first query block is <= pid
        lo = pid * 0  # int32 scalars (a literal 0 would be a constexpr)
        hi = lo + num_seqs
        while lo < hi - 1:
            mid = (lo + hi) // 2
            start_block = tl.load(query_start_loc_ptr + mid).to(tl.int32) // BLOCK_Q + mid
            if start_block <= pid:
                lo = mid
            else:
                hi = mid
        seq = lo
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
        local_block = pid - (q_start // BLOCK_Q + seq)
        if local_block * BLOCK_Q < q_len:
            seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
            context = seq_len - q_len  # tokens cached before this step's queries

            rows = tl.arange(0, BLOCK_M)  # (M,)
            q_local = local_block * BLOCK_Q + rows // GROUP  # query token within the sequence
            head = kv_head * GROUP + rows % GROUP  # query head
            row_ok = (rows // GROUP < BLOCK_Q) & (q_local < q_len)  # (M,)
            q_pos = context + q_local  # (M,) absolute position of each row's query
            d = tl.arange(0, DIM_PAD)  # (D,)
            d_ok = d < HEAD_DIM

            q_off = (
                (q_start + q_local)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
            )
            q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
            if UPCAST:
                q = q.to(tl.float32)

            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)

            # the last key any row of this block may see, plus one
            last_q = tl.minimum(local_block * BLOCK_Q + BLOCK_Q, q_len)
            kv_end = context + last_q
            table = block_tables_ptr + seq.to(tl.int64) * stride_bt
            head_off = kv_head * cache_head_stride
            for n0 in range(0, kv_end, TILE_N):
                k_pos = n0 + tl.arange(0, TILE_N)  # (N,)
                k_ok = k_pos < kv_end
                blk = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
                slot_off = blk * cache_block_stride + (k_pos % BLOCK_SIZE) * cache_pos_stride
                kv_off = slot_off[:, None] + head_off + d[None, :]  # (N, D)
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)  # (N, D)
                v = tl.load(cache_ptr + cache_kv_stride + kv_off, mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                else:
                    # an fp8 cache is read as the query dtype (a no-op otherwise)
                    k = k.to(q_ptr.dtype.element_ty)
                    v = v.to(q_ptr.dtype.element_ty)

                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (M, N)
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * qk_scale
                visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
                s = tl.where(visible, s, float("-inf"))

                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp2(s - m_new[:, None])  # (M, N)
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None]
                # P is rounded to the query dtype (the cache's, unless that is fp8), as
                # flash attention does
                p = p.to(q_ptr.dtype.element_ty).to(v.dtype)
                if IEEE:
                    acc += tl.dot(p, v, input_precision="ieee")
                else:
                    acc += tl.dot(p, v)
                m_i = m_new

            l_i = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_i[:, None] * v_scale
            o_off = (
                (q_start + q_local)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
            )
            tl.store(
                out_ptr + o_off,
                out.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )

    return {
        "write_kv": _write_kv_kernel,
        "attention": _paged_attention_kernel,
        "next_power_of_2": triton.next_power_of_2,
    }


def fp8_kv_supported(device: torch.device | str) -> bool:
    """Whether the compiled kernels can load and store a float8 e4m3 cache on
    ``device``: CUDA compute capability 8.9+ (Ada, Hopper), or the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return _interpreting()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    """A CUDA device's compute capability, read once (checked on every launch)."""
    return torch.cuda.get_device_capability(index)


def _check_fp8_device(device: torch.device) -> None:
    if not fp8_kv_supported(device):
        raise ValueError(
            f"kv_cache_dtype fp8: the Triton kernels need compute capability 8.9+ for "
            f"float8 e4m3 (H100/H200 class), {device} has less; use "
            "--attention-backend torch or --kv-cache-dtype auto"
        )


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be (2, num_blocks, block_size, n_kv, head_dim), got "
            f"{tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")


def check_writable_cache(kv_cache: torch.Tensor) -> bool:
    """What a kernel that stores K/V by flat slot needs of ``kv_cache``: blocks laid out
    back to back (block and position collapse into one slot stride) and, for an fp8
    cache, a device that can store fp8. Returns whether the cache is fp8."""
    if kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError("kv_cache's blocks must be laid out back to back")
    fp8 = is_fp8(kv_cache.dtype)
    if fp8:
        _check_fp8_device(kv_cache.device)
    return fp8


def triton_write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store ``k``/``v`` (T, n_kv, hd) at flat slots ``slot_mapping`` (T,) of
    ``kv_cache`` (2, num_blocks, block_size, n_kv, hd), in one launch. Slots < 0 are
    skipped (padding tokens). An fp8 cache stores the bytes of
    :func:`~lmfleet.engine.layers.attention.to_fp8` with ``k_scale``/``v_scale``."""
    kern = _kernels()
    _check_cache(kv_cache)
    check_kv_scales(kv_cache, k_scale, v_scale)
    num_tokens, n_kv, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    fp8 = check_writable_cache(kv_cache)
    if not fp8 and (k.dtype != kv_cache.dtype or v.dtype != kv_cache.dtype):
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    nxt = kern["next_power_of_2"]
    kern["write_kv"][(num_tokens,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        inverse_scale(k_scale),
        inverse_scale(v_scale),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        N_KV=n_kv,
        HEAD_DIM=head_dim,
        HEADS_PAD=nxt(n_kv),
        DIM_PAD=nxt(head_dim),
        FP8_MAX=FP8_KV_MAX if fp8 else 0.0,
        enable_fp_fusion=False,  # the fp8 rounding must not be contracted into FMAs
    )


def _launch_config(
    max_query_len: int, group: int, nxt: Callable[[int], int], *, fp32: bool = False
) -> dict[str, int]:
    """Tile sizes: 16 rows for decode-only steps (one token per sequence), larger
    query blocks once any sequence brings a prompt chunk. fp32 prefill tiles get 8
    warps: with 4, ptxas spills about 18 KB per thread on sm_90
    (``benchmarks/gpu/compile_check.py``)."""
    rows = 16 if max_query_len == 1 else 64
    block_m = max(rows, nxt(group))
    warps = 8 if fp32 and rows > 16 else 4
    return {"BLOCK_M": block_m, "BLOCK_Q": max(block_m // group, 1), "num_warps": warps}


def triton_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of ``q`` (T, n_heads, hd) over the cache, whose slots for this step's
    tokens are already written; returns (T, n_heads, hd). ``k_scale``/``v_scale``
    dequantize an fp8 cache."""
    kern = _kernels()
    _check_cache(kv_cache)
    check_kv_scales(kv_cache, k_scale, v_scale)
    num_tokens, n_heads, head_dim = q.shape
    n_kv = kv_cache.shape[3]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads is not a multiple of {n_kv} KV heads")
    if kv_cache.shape[-1] != head_dim or kv_cache.shape[2] != meta.block_size:
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} does not match head_dim {head_dim} "
            f"and block_size {meta.block_size}"
        )
    out = torch.empty(num_tokens, n_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if is_fp8(kv_cache.dtype):
        _check_fp8_device(kv_cache.device)  # q keeps its dtype: K/V convert to it
    elif q.dtype != kv_cache.dtype:
        q = q.to(kv_cache.dtype)
    nxt = kern["next_power_of_2"]
    group = n_heads // n_kv
    cfg = _launch_config(meta.max_query_len, group, nxt, fp32=q.dtype == torch.float32)
    num_seqs = meta.num_seqs
    grid = (num_tokens // cfg["BLOCK_Q"] + num_seqs, n_kv)
    tables = meta.block_tables
    kern["attention"][grid](
        q,
        kv_cache,
        out,
        tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale * _LOG2E * k_scale,
        v_scale,
        num_seqs,
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
        DIM_PAD=max(nxt(head_dim), 16),
        BLOCK_SIZE=meta.block_size,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_Q=cfg["BLOCK_Q"],
        TILE_N=32 if meta.block_size <= 16 else 64,
        IEEE=q.dtype == torch.float32,
        UPCAST=_interpreting() and (q.dtype, kv_cache.dtype) != (torch.float32, torch.float32),
        num_warps=cfg["num_warps"],
        enable_fp_fusion=True,  # explicit: Triton 3.10 turns the default off
    )
    return out


def triton_paged_attention(
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

    Same contract as :func:`lmfleet.engine.layers.attention.paged_attention`: ``q`` is
    (T, n_heads, hd), ``k`` and ``v`` (T, n_kv, hd); ``kv_cache`` is one layer's
    (2, num_blocks, block_size, n_kv, hd) cache, updated in place; ``k_scale`` and
    ``v_scale`` are an fp8 cache's scales. Raises :class:`TritonUnavailable` when
    Triton is missing.
    """
    triton_write_kv(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
    return triton_attend(q, kv_cache, meta, scale, k_scale, v_scale)


def triton_attend(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The attention half of :func:`triton_paged_attention`, over a cache that already
    holds this step's K/V (written by :func:`triton_write_kv` or by
    :func:`~lmfleet.engine.layers.triton_fused.qk_norm_rope_write_kv`): the split-K
    decode kernel for decode steps too small to fill the GPU, else the varlen kernel.
    Returns (T, n_heads, hd)."""
    if meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0]:
        # a decode step too small to fill the GPU: split each context (flash decoding)
        from lmfleet.engine.layers.triton_decode import decode_splits_for, triton_decode_attention

        splits = decode_splits_for(q.shape[0], kv_cache.shape[3], q.device)
        if splits > 1:
            return triton_decode_attention(
                q, kv_cache, meta, scale, num_splits=splits, k_scale=k_scale, v_scale=v_scale
            )
    return triton_attention(q, kv_cache, meta, scale, k_scale, v_scale)


#: ``(q, k, v, kv_cache, meta, scale, k_scale, v_scale) -> out``; the last two default
#: to 1.0 (see :func:`~lmfleet.engine.layers.attention.paged_attention`)
AttentionFn = Callable[..., torch.Tensor]


def attend_only(fn: AttentionFn) -> Callable[..., torch.Tensor] | None:
    """The attention half of the write-and-attend backend ``fn``, for layers whose
    fused ops write the cache themselves: :func:`triton_attend` for
    :func:`triton_paged_attention`; None for a backend without one (the torch
    reference)."""
    return triton_attend if fn is triton_paged_attention else None


def attention_backend(device: torch.device | str, name: str = "auto") -> AttentionFn:
    """The paged-attention function for ``device``: ``"triton"``, ``"torch"`` (the CPU
    reference), or ``"auto"`` (Triton on CUDA when it is installed, else torch)."""
    from lmfleet.engine.layers.attention import paged_attention

    device = torch.device(device)
    if name == "torch":
        return paged_attention
    if name == "triton":
        _kernels()  # raises TritonUnavailable with the fix
        return triton_paged_attention
    if name != "auto":
        raise ValueError(f"attention backend must be 'auto', 'triton' or 'torch', got {name!r}")
    if device.type == "cuda" and triton_available():
        return triton_paged_attention
    return paged_attention


__all__ = [
    "TritonUnavailable",
    "attend_only",
    "attention_backend",
    "check_writable_cache",
    "fp8_kv_supported",
    "triton_attend",
    "triton_attention",
    "triton_available",
    "triton_paged_attention",
    "triton_write_kv",
]
