"""Fused Triton kernels for the elementwise parts of a Llama/Qwen3 decoder layer.

The eager layer spends most of its kernel launches on small elementwise ops: an
RMSNorm alone is about eight torch kernels, the rotary embedding over a dozen. Each
function here does one of those groups in a single launch whose grid depends only on
tensor shapes (no ``.item()``, no host syncs), so they can be captured in CUDA graphs:

- :func:`rms_norm`: ``RMSNorm`` of :mod:`lmfleet.engine.layers.norm` (one program per row).
- :func:`fused_add_rms_norm`: the residual add followed by that norm.
- :func:`qk_norm_rope`: Qwen3's per-head q/k RMSNorm (optional) and the rotate-half
  rotary embedding of :mod:`lmfleet.engine.layers.rotary`, for q and k in one launch.
- :func:`qk_norm_rope_write_kv`: the same, with the rotated keys and the values
  stored straight into the paged KV cache (what ``triton_write_kv`` stores, bytes
  included for fp8), so the layer's separate K/V write launch goes away.
- :func:`silu_and_mul`: ``F.silu(gate) * up`` over a fused gate/up projection.

Rounding follows the torch reference step by step: every op the reference does in
bf16/fp16 is done here in fp32 and rounded to that dtype (round to nearest even)
right after, which is what torch itself does for reduced-precision elementwise ops.
The rounding is done with integer arithmetic on the fp32 bits (:func:`_round_to` in the
kernels) because Triton's interpreter truncates fp32 -> bf16 casts; values are
stored only once they are exactly representable, so the final cast is exact on every
backend. Where results can still differ from torch:

- the sum of squares of an RMSNorm is a reduction whose order differs from torch's
  (CPU or CUDA), so the variance may differ in its last fp32 bit. fp32 outputs then
  differ by a few ulp (at most 4 measured in the interpreter, about 1e-6); for bf16
  the difference rarely survives the rounding (none measured in 6e5 values), and is
  one bf16 ulp when it does. Inputs whose squares sum exactly in fp32 in any order
  give bitwise equal results, which is how the tests check everything else.
- ``silu`` uses ``tl.exp`` (numpy's exp in the interpreter, a fast approximate exp on
  GPUs), not torch's exp: a few fp32 ulps (at most 4 measured in the interpreter),
  rarely visible after bf16 rounding (none measured in 3e5 values).
- mean, ``rsqrt`` and the silu division are correctly rounded (``div_rn``,
  ``sqrt_rn``), as torch's CPU kernels are; torch's CUDA ``rsqrt`` is approximate.
- the rotary part (table cast, products, sum and difference) and the residual add
  are bitwise.

The kernels are launched with ``enable_fp_fusion=False`` so the compiler does not
contract a multiply and an add into an FMA, which torch's separate kernels never do.

Triton is imported lazily: this module imports without it, and the functions raise
:class:`~lmfleet.engine.layers.triton_attention.TritonUnavailable` only when called.
With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmfleet.engine.layers import triton_attention
from lmfleet.engine.layers.attention import FP8_KV_MAX, check_kv_scales, inverse_scale, is_fp8
from lmfleet.engine.layers.triton_attention import (
    _check_cache,
    _interpreting,
    check_writable_cache,
    import_triton,
)

#: how each supported float dtype is encoded for the kernels' ``*_KIND`` constexprs
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: the widest row an RMSNorm program holds in registers
_MAX_NORM_BLOCK = 65536
#: elements per silu_and_mul program along the intermediate dimension
_SILU_BLOCK = 1024
#: elements (heads x head_dim) per qk_norm_rope program
_QK_BLOCK = 1024

#: the rounding helper the kernels call, set by :func:`_kernels`. It is a module global
#: because jitted functions resolve callees through their globals (closures are
#: invisible to the compiler and to the interpreter).
_round_to: Any = None
#: ``triton_attention``'s fp8 rounding helper, the same way
_fp8_grid: Any = None


def _kind(dtype: torch.dtype, what: str) -> int:
    try:
        return _KINDS[dtype]
    except KeyError:
        raise ValueError(f"{what} must be float32, bfloat16 or float16, got {dtype}") from None


def _num_warps(block: int) -> int:
    """Warps for a program holding ``block`` elements: about 8 per thread, 1 to 8 warps."""
    return max(1, min(8, block // 256))


@functools.cache
def _kernels() -> dict[str, Any]:
    """Compile-on-first-use kernels, built once; raises ``TritonUnavailable``."""
    triton, tl = import_triton("the fused Triton kernels")
    global _round_to, _fp8_grid
    triton_attention._kernels()  # defines the fp8 rounding helper
    _fp8_grid = triton_attention._fp8_grid

    def _round_to_impl(x, KIND: tl.constexpr):
        """fp32 ``x`` rounded (to nearest, ties to even) to the dtype ``KIND``
        encodes, returned as fp32: KIND 0 fp32 (no-op), 1 bf16, 2 fp16."""
        y = x
        if KIND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        elif KIND == 2:
            y = x.to(tl.float16).to(tl.float32)  # exact on GPU and in the interpreter
        return y

    # The interpreter runs kernels as Python with triton.language patched, so the
    # helper can stay a plain function there: a jitted callee would re-patch the
    # language on every call, which makes the tests several times slower.
    _round_to = _round_to_impl if _interpreting() else triton.jit(_round_to_impl)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        stride_x,
        stride_r,
        stride_o,
        eps,
        H: tl.constexpr,  # hidden size
        BLOCK: tl.constexpr,  # next power of two >= H
        X_KIND: tl.constexpr,  # dtype of x (and of the residual sum)
        O_KIND: tl.constexpr,  # dtype of weight * normed x
        ADD_RESIDUAL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)  # (BLOCK,)
        mask = cols < H
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = _round_to(h + r, X_KIND)  # x + residual in x's dtype
            tl.store(res_ptr + row * stride_r + cols, h.to(res_ptr.dtype.element_ty), mask=mask)
        # mean of squares, then 1 / sqrt, both correctly rounded as torch does on CPU
        var = tl.div_rn(tl.sum(h * h, axis=0), tl.full((), H, tl.float32))
        inv = tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(var + eps))
        normed = _round_to(h * inv, X_KIND)  # h.to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        out = _round_to(w * normed, O_KIND)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr,
        k_ptr,
        qo_ptr,
        ko_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        qw_ptr,
        kw_ptr,
        v_ptr,  # WRITE_KV only: the values, (T, n_kv, hd) strided
        cache_ptr,  # WRITE_KV only: one layer's (2, blocks, block_size, n_kv, hd) cache
        slot_ptr,  # WRITE_KV only: (T,) flat cache slots, < 0 for padding tokens
        k_inv_scale,  # fp32 1 / k_scale (fp8 caches only)
        v_inv_scale,
        eps,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_qot,
        stride_qoh,
        stride_kot,
        stride_koh,
        stride_cos,
        stride_sin,
        cache_kv_stride,
        cache_slot_stride,
        cache_head_stride,
        N_Q: tl.constexpr,  # query heads
        N_KV: tl.constexpr,  # key heads
        Q_BLOCKS: tl.constexpr,  # programs along axis 1 that take query heads; the rest keys
        BLOCK_H: tl.constexpr,  # heads per program
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,  # HEAD_DIM // 2
        HALF_PAD: tl.constexpr,  # next power of two >= HALF
        HAS_NORM: tl.constexpr,
        X_KIND: tl.constexpr,  # dtype of q and k
        O_KIND: tl.constexpr,  # dtype of the normed q/k, the rotary and the outputs
        WRITE_KV: tl.constexpr,  # key programs store k and v into the cache, not k_out
        FP8_MAX: tl.constexpr,  # > 0: an fp8 cache; scale, saturate and round on store
    ):
        t = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        h = tl.arange(0, BLOCK_H)  # (BH,)
        if blk < Q_BLOCKS:
            heads = blk * BLOCK_H + h
            heads_ok = heads < N_Q
            src = q_ptr + t * stride_qt + heads[:, None] * stride_qh  # (BH, 1)
            dst = qo_ptr + t * stride_qot + heads[:, None] * stride_qoh  # (BH, 1)
            w_ptr = qw_ptr
        else:
            heads = (blk - Q_BLOCKS) * BLOCK_H + h
            heads_ok = heads < N_KV
            src = k_ptr + t * stride_kt + heads[:, None] * stride_kh
            dst = ko_ptr + t * stride_kot + heads[:, None] * stride_koh
            w_ptr = kw_ptr
        d = tl.arange(0, HALF_PAD)  # (HALF_PAD,)
        d_ok = d < HALF
        mask = heads_ok[:, None] & d_ok[None, :]  # (BH, HALF_PAD)
        x1 = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)  # first halves
        x2 = tl.load(src + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)  # second
        if HAS_NORM:
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)  # (BH,)
            var = tl.div_rn(ss, tl.full([BLOCK_H], HEAD_DIM, tl.float32))
            inv = tl.div_rn(tl.full([BLOCK_H], 1.0, tl.float32), tl.sqrt_rn(var + eps))
            w1 = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]  # (1, HALF_PAD)
            w2 = tl.load(w_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            x1 = _round_to(w1 * _round_to(x1 * inv[:, None], X_KIND), O_KIND)
            x2 = _round_to(w2 * _round_to(x2 * inv[:, None], X_KIND), O_KIND)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        # the tables are cast to the rotated dtype before the products, as in torch
        cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)
        cos = _round_to(cos, O_KIND)[None, :]  # (1, HALF_PAD)
        sin = _round_to(sin, O_KIND)[None, :]
        o1 = _round_to(_round_to(x1 * cos, O_KIND) - _round_to(x2 * sin, O_KIND), O_KIND)
        o2 = _round_to(_round_to(x2 * cos, O_KIND) + _round_to(x1 * sin, O_KIND), O_KIND)
        out_ty = qo_ptr.dtype.element_ty
        # the constexpr test alone first: without WRITE_KV the cache path is not compiled
        if not WRITE_KV:  # noqa: SIM114
            tl.store(dst + d[None, :], o1.to(out_ty), mask=mask)
            tl.store(dst + HALF + d[None, :], o2.to(out_ty), mask=mask)
        elif blk < Q_BLOCKS:
            tl.store(dst + d[None, :], o1.to(out_ty), mask=mask)
            tl.store(dst + HALF + d[None, :], o2.to(out_ty), mask=mask)
        else:  # rotated keys and the values go to the token's cache slot, k_out unused
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                vsrc = v_ptr + t * stride_vt + heads[:, None] * stride_vh  # (BH, 1)
                v1 = tl.load(vsrc + d[None, :], mask=mask, other=0.0).to(tl.float32)
                v2 = tl.load(vsrc + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
                if FP8_MAX > 0:  # scale in fp32 (exact: o1/o2 hold O_KIND values), round
                    o1 = _fp8_grid(o1 * k_inv_scale, FP8_MAX)
                    o2 = _fp8_grid(o2 * k_inv_scale, FP8_MAX)
                    v1 = _fp8_grid(v1 * v_inv_scale, FP8_MAX)
                    v2 = _fp8_grid(v2 * v_inv_scale, FP8_MAX)
                cty = cache_ptr.dtype.element_ty
                kdst = cache_ptr + slot * cache_slot_stride + heads[:, None] * cache_head_stride
                vdst = kdst + cache_kv_stride
                tl.store(kdst + d[None, :], o1.to(cty), mask=mask)
                tl.store(kdst + HALF + d[None, :], o2.to(cty), mask=mask)
                tl.store(vdst + d[None, :], v1.to(cty), mask=mask)
                tl.store(vdst + HALF + d[None, :], v2.to(cty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,
        out_ptr,
        stride_x,
        stride_o,
        INTER: tl.constexpr,  # intermediate size: gate is x[:, :INTER], up x[:, INTER:]
        BLOCK: tl.constexpr,
        KIND: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        mask = cols < INTER
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
        act = _round_to(tl.div_rn(g, 1.0 + tl.exp(-g)), KIND)  # F.silu rounds once
        out = _round_to(act * u, KIND)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_rows_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        stride_x,
        stride_q,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        FP8_MAX: tl.constexpr,
        MIN_SCALE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)  # (K,)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(tl.div_rn(amax, FP8_MAX), MIN_SCALE)
        # saturated and on the e4m3 grid: the cast below is then exact on every backend
        y = _fp8_grid(tl.div_rn(x, scale), FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(scale_ptr + row, scale)

    return {
        "fp8_rows": _fp8_rows_kernel,
        "rms_norm": _rms_norm_kernel,
        "qk_norm_rope": _qk_norm_rope_kernel,
        "silu_and_mul": _silu_and_mul_kernel,
        "next_power_of_2": triton.next_power_of_2,
        "cdiv": triton.cdiv,
    }


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (T, hidden), got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous")


def _launch_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    kern = _kernels()
    _check_rows("x", x)
    num_tokens, hidden = x.shape  # (T, hidden)
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    x_kind = _kind(x.dtype, "x")
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    o_kind = _kind(out_dtype, "weight * x")
    block = kern["next_power_of_2"](hidden)
    if block > _MAX_NORM_BLOCK:
        raise ValueError(f"hidden size {hidden} is larger than {_MAX_NORM_BLOCK}")
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=x.device)  # (T, hidden)
    if num_tokens == 0:
        return out
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    kern["rms_norm"][(num_tokens,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        eps,
        H=hidden,
        BLOCK=block,
        X_KIND=x_kind,
        O_KIND=o_kind,
        ADD_RESIDUAL=residual is not None,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x`` (T, hidden) with ``weight`` (hidden,), in one launch.

    Same result as :class:`~lmfleet.engine.layers.norm.RMSNorm`: normalise in fp32,
    round to ``x``'s dtype, multiply by the weight; the output (T, hidden) is a new
    contiguous tensor of dtype ``promote_types(weight.dtype, x.dtype)``. ``x`` may have
    any row stride but its last dimension must be contiguous. Dtypes: float32,
    bfloat16, float16.
    """
    return _launch_norm(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` then ``rms_norm(r, weight, eps)``, in one launch.

    ``x`` and ``residual`` are (T, hidden) of the same dtype, last dimension contiguous.
    The sum is rounded to that dtype as torch's ``x + residual`` is, and written **in
    place into** ``residual``; the normed rows go to a new (T, hidden) tensor. Returns
    ``(normed, residual)``, the second being the caller's (now updated) tensor.
    """
    _check_rows("residual", residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    return _launch_norm(x, residual, weight, eps), residual


def _check_heads(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D (T, heads, head_dim), got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm, then rotate-half rotary embedding, of q and k in one launch.

    - ``q`` (T, n_heads, hd) and ``k`` (T, n_kv, hd), same dtype; any token and head
      strides (e.g. views of a fused qkv projection), last dimension contiguous.
    - ``positions`` (T,) integer absolute positions, each ``< max_pos`` (not checked:
      that would need a host sync).
    - ``cos_cache``/``sin_cache`` (max_pos, hd // 2), the tables of
      :class:`~lmfleet.engine.layers.rotary.RotaryEmbedding`.
    - ``q_weight``/``k_weight`` (hd,) RMSNorm weights of Qwen3's ``q_norm``/``k_norm``,
      or both ``None`` for no norm (Llama).

    Returns ``(q_out, k_out)`` of shapes (T, n_heads, hd) and (T, n_kv, hd): new
    contiguous tensors, or with ``inplace=True`` the results are written back into
    ``q`` and ``k`` (each program reads its whole head before writing it) and those are
    returned. The output dtype is ``q``'s, or ``promote_types(weight, q)`` with a norm.
    """
    q_in, k_in = q, k
    qk = _QKLaunch.check(q, k, positions, cos_cache, sin_cache, q_weight, k_weight)
    if inplace:
        if qk.q is not q_in or qk.k is not k_in:
            raise ValueError("inplace=True needs q and k with a contiguous last dimension")
        if qk.out_dtype != q.dtype:
            raise ValueError(f"inplace=True cannot store {qk.out_dtype} results into {q.dtype} q/k")
        q_out, k_out = qk.q, qk.k
    else:
        q_out = torch.empty(qk.q.shape, dtype=qk.out_dtype, device=q.device)
        k_out = torch.empty(qk.k.shape, dtype=qk.out_dtype, device=q.device)
    qk.launch(q_out, k_out, eps)
    return q_out, k_out


def qk_norm_rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """:func:`qk_norm_rope`, with the rotated keys and the values stored straight into
    the paged cache, in one launch; returns the rotated queries (T, n_heads, hd).

    Does what ``qk_norm_rope`` followed by
    :func:`~lmfleet.engine.layers.triton_attention.triton_write_kv` does, byte for byte
    in the cache, one launch and one (T, n_kv, hd) round trip through memory fewer: the
    programs that rotate a block of key heads write those heads and the matching
    value heads to slot ``slot_mapping[t]`` of ``kv_cache`` (2, num_blocks,
    block_size, n_kv, hd); a negative slot (a padding token) is skipped. ``v`` is
    (T, n_kv, hd), any strides with a contiguous last dimension. An fp8 cache stores
    ``fp8(clamp(x * fp32(1 / scale)))`` with ``k_scale``/``v_scale``, as
    ``triton_write_kv`` does. A cache of another float dtype than the rotated keys
    (``promote_types(weight, q)``) is written by the separate kernel instead, so that
    every cast matches ``triton_write_kv``'s.
    """
    qk = _QKLaunch.check(q, k, positions, cos_cache, sin_cache, q_weight, k_weight)
    _check_cache(kv_cache)
    check_kv_scales(kv_cache, k_scale, v_scale)
    if v.shape != qk.k.shape:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(qk.k.shape)}")
    if kv_cache.shape[3:] != qk.k.shape[1:]:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not match k {tuple(qk.k.shape)}")
    if slot_mapping.shape != (qk.q.shape[0],):
        raise ValueError(
            f"slot_mapping must be ({qk.q.shape[0]},), got {tuple(slot_mapping.shape)}"
        )
    fp8 = is_fp8(kv_cache.dtype)
    q_out = torch.empty(qk.q.shape, dtype=qk.out_dtype, device=q.device)
    if not fp8 and kv_cache.dtype != qk.out_dtype:
        k_out = torch.empty(qk.k.shape, dtype=qk.out_dtype, device=q.device)
        qk.launch(q_out, k_out, eps)
        triton_attention.triton_write_kv(k_out, v, kv_cache, slot_mapping, k_scale, v_scale)
        return q_out
    check_writable_cache(kv_cache)
    if v.stride(-1) != 1:
        v = v.contiguous()
    qk.launch(
        q_out,
        None,
        eps,
        cache=_CacheWrite(
            v, kv_cache, slot_mapping, inverse_scale(k_scale), inverse_scale(v_scale), fp8
        ),
    )
    return q_out


@dataclass(frozen=True, slots=True)
class _CacheWrite:
    """Where :func:`qk_norm_rope_write_kv`'s key programs store K and V."""

    v: torch.Tensor  # (T, n_kv, hd), last dimension contiguous
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, n_kv, hd)
    slot_mapping: torch.Tensor  # (T,)
    k_inv_scale: float
    v_inv_scale: float
    fp8: bool


@dataclass(frozen=True, slots=True)
class _QKLaunch:
    """Checked arguments of the q/k norm + rotary kernel (see :func:`qk_norm_rope`)."""

    q: torch.Tensor  # (T, n_heads, hd), last dimension contiguous
    k: torch.Tensor  # (T, n_kv, hd), likewise
    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    q_weight: torch.Tensor | None
    k_weight: torch.Tensor | None
    x_kind: int
    out_dtype: torch.dtype

    @classmethod
    def check(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
    ) -> _QKLaunch:
        _kernels()
        if (q_weight is None) != (k_weight is None):
            raise ValueError("q_weight and k_weight must both be given or both be None")
        q, k = _check_heads("q", q), _check_heads("k", k)
        num_tokens, _, head_dim = q.shape
        if k.shape[0] != num_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
            raise ValueError(
                f"k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}"
            )
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        half = head_dim // 2
        if positions.shape != (num_tokens,):
            raise ValueError(f"positions must be ({num_tokens},), got {tuple(positions.shape)}")
        for name, table in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
            if table.dim() != 2 or table.shape[1] != half:
                raise ValueError(f"{name} must be (max_pos, {half}), got {tuple(table.shape)}")
        if cos_cache.stride(-1) != 1:
            cos_cache = cos_cache.contiguous()
        if sin_cache.stride(-1) != 1:
            sin_cache = sin_cache.contiguous()
        x_kind = _kind(q.dtype, "q")
        out_dtype = q.dtype
        if q_weight is not None and k_weight is not None:
            if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
                raise ValueError(f"q_weight and k_weight must be ({head_dim},)")
            if q_weight.dtype != k_weight.dtype:
                raise ValueError("q_weight and k_weight must have the same dtype")
            q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
            out_dtype = torch.promote_types(q_weight.dtype, q.dtype)
        _kind(out_dtype, "the normed q")
        return cls(q, k, positions, cos_cache, sin_cache, q_weight, k_weight, x_kind, out_dtype)

    def launch(
        self,
        q_out: torch.Tensor,
        k_out: torch.Tensor | None,
        eps: float,
        cache: _CacheWrite | None = None,
    ) -> None:
        """Rotated q into ``q_out``; rotated k into ``k_out``, or with ``cache`` k and
        v into the cache (``k_out`` unused)."""
        kern = _kernels()
        q, k = self.q, self.k
        num_tokens, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        if num_tokens == 0:
            return
        nxt = kern["next_power_of_2"]
        half = head_dim // 2
        half_pad = nxt(half)
        # a block of heads per program: up to _QK_BLOCK elements, no more heads than k has
        block_h = max(1, min(nxt(n_kv), _QK_BLOCK // (2 * half_pad)))
        q_blocks = kern["cdiv"](n_heads, block_h)
        grid = (num_tokens, q_blocks + kern["cdiv"](n_kv, block_h))
        if cache is None:
            assert k_out is not None
            v, kv_cache, slots, k_inv, v_inv = k, k, self.positions, 1.0, 1.0
            cache_strides = (0, 0, 0)
        else:
            v, kv_cache, slots = cache.v, cache.kv_cache, cache.slot_mapping
            k_inv, v_inv = cache.k_inv_scale, cache.v_inv_scale
            k_out = q_out  # unused: the key programs write the cache
            cache_strides = (kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3))
        kern["qk_norm_rope"][grid](
            q,
            k,
            q_out,
            k_out,
            self.positions,
            self.cos_cache,
            self.sin_cache,
            q if self.q_weight is None else self.q_weight,  # unused without a norm
            k if self.k_weight is None else self.k_weight,
            v,
            kv_cache,
            slots,
            k_inv,
            v_inv,
            eps,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            self.cos_cache.stride(0),
            self.sin_cache.stride(0),
            *cache_strides,
            N_Q=n_heads,
            N_KV=n_kv,
            Q_BLOCKS=q_blocks,
            BLOCK_H=block_h,
            HEAD_DIM=head_dim,
            HALF=half,
            HALF_PAD=half_pad,
            HAS_NORM=self.q_weight is not None,
            X_KIND=self.x_kind,
            O_KIND=_kind(self.out_dtype, "the normed q"),
            WRITE_KV=cache is not None,
            FP8_MAX=FP8_KV_MAX if cache is not None and cache.fp8 else 0.0,
            num_warps=_num_warps(block_h * 2 * half_pad),
            enable_fp_fusion=False,
        )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for ``gate_up`` (T, 2 * I) = cat(gate, up); returns (T, I).

    ``gate_up`` may have any row stride, last dimension contiguous; the output is a
    new contiguous tensor of its dtype (float32, bfloat16 or float16).
    """
    kern = _kernels()
    _check_rows("gate_up", gate_up)
    num_tokens, width = gate_up.shape  # (T, 2 * I)
    if width % 2:
        raise ValueError(f"gate_up's last dimension must be even, got {width}")
    inter = width // 2
    kind = _kind(gate_up.dtype, "gate_up")
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)  # (T, I)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(kern["next_power_of_2"](inter), _SILU_BLOCK)
    kern["silu_and_mul"][(num_tokens, kern["cdiv"](inter, block))](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        INTER=inter,
        BLOCK=block,
        KIND=kind,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return out


def quantize_fp8_rows(
    x: torch.Tensor, fp8_max: float, min_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic fp8 quantization in one launch: ``x`` (M, K) -> (float8 e4m3
    (M, K), float32 scales (M, 1)) with ``scale = max(amax(|row|) / fp8_max,
    min_scale)`` and ``q = clamp(x / scale, ±fp8_max)``, as
    :func:`lmfleet.engine.layers.quant.quantize_fp8_rows` computes them with about
    eight torch kernels. Scales and fp8 bytes are bitwise those of the torch version
    (the kernel rounds to the e4m3 grid itself before the cast)."""
    kern = _kernels()
    _check_rows("x", x)
    rows, width = x.shape
    q = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows == 0 or width == 0:
        return q, scale
    block = kern["next_power_of_2"](width)
    kern["fp8_rows"][(rows,)](
        x,
        q,
        scale,
        x.stride(0),
        q.stride(0),
        K=width,
        BLOCK=block,
        FP8_MAX=fp8_max,
        MIN_SCALE=min_scale,
        num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return q, scale


@dataclass(frozen=True, slots=True)
class FusedOps:
    """The fused kernels a decoder layer calls instead of its torch modules (see
    ``LlamaForCausalLM.set_fused_ops``)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    qk_norm_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    #: ``qk_norm_rope`` that also stores K/V into the cache and returns q alone; the
    #: layer uses it when its attention backend can attend over a written cache
    qk_norm_rope_write_kv: Callable[..., torch.Tensor] | None = None


def triton_fused_ops() -> FusedOps:
    """The Triton kernels of this module as :class:`FusedOps`; raises
    :class:`TritonUnavailable` when Triton is missing."""
    _kernels()
    return FusedOps(rms_norm, fused_add_rms_norm, qk_norm_rope, silu_and_mul, qk_norm_rope_write_kv)


__all__ = [
    "FusedOps",
    "fused_add_rms_norm",
    "qk_norm_rope",
    "qk_norm_rope_write_kv",
    "quantize_fp8_rows",
    "rms_norm",
    "silu_and_mul",
    "triton_fused_ops",
]
