"""The fused Triton elementwise kernels against the torch layers they replace.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is imported); the file skips when Triton is not installed. Tests marked
``gpu`` run the compiled kernels on CUDA.

What is compared how:

- bitwise (``torch.equal``): the rotary embedding, the residual add, and every
  RMSNorm on "exactly summable" inputs (multiples of 1/16 whose squares add up
  exactly in fp32 in any order), where only the reduction order could differ;
- to within a stated tolerance: RMSNorm on random inputs (the sum of squares is
  reduced in another order than torch's) and silu (another exp implementation).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lmfleet.engine.layers import triton_fused
from lmfleet.engine.layers.attention import write_kv
from lmfleet.engine.layers.norm import RMSNorm
from lmfleet.engine.layers.rotary import RotaryEmbedding
from lmfleet.engine.layers.triton_attention import TritonUnavailable, triton_write_kv
from lmfleet.engine.layers.triton_fused import (
    fused_add_rms_norm,
    qk_norm_rope,
    qk_norm_rope_write_kv,
    rms_norm,
    silu_and_mul,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
#: explicit mantissa bits, for measuring differences in units in the last place
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}

# Qwen3-0.6B
HIDDEN, N_HEADS, N_KV, HEAD_DIM, INTER = 1024, 16, 8, 128, 3072
EPS = 1e-6
#: RMSNorm on random rows: the largest difference allowed, in ulp of the output
NORM_ULPS = {torch.float32: 8, torch.bfloat16: 1}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|out - ref|`` in units in the last place of ``ref`` (in ref's dtype)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.numel() == 0:
        return 0.0
    r = ref.double()
    _, exp = torch.frexp(r)  # |r| = m * 2**exp, 0.5 <= m < 1
    spacing = torch.pow(2.0, (exp - 1 - _MANTISSA[ref.dtype]).double())
    return ((out.double() - r).abs() / spacing).max().item()


def _summable(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/16 in [-2, 2]: exact in bf16, and squares of them add up exactly
    in fp32 in any order (for rows up to 2**16 long), so the norm's variance does not
    depend on the reduction order."""
    return (torch.randint(-32, 33, shape, generator=gen).float() / 16).to(dtype)


def _weight(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(n, generator=gen)).to(dtype)


def _ref_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps, dtype=weight.dtype, device=x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [HIDDEN, 896, 40])
def test_rms_norm_bitwise_on_summable_inputs(dtype: torch.dtype, hidden: int) -> None:
    gen = _gen(hidden)
    wide = _summable((4, hidden + 8), gen, dtype)
    x = wide[:, 3 : 3 + hidden]  # (4, hidden), row stride hidden + 8
    weight = _weight(hidden, gen, dtype)
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, _ref_norm(x, weight))
    # the test can fail: another eps changes the result
    assert not torch.equal(rms_norm(x, weight, 1e-2), _ref_norm(x, weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [HIDDEN, 896])
def test_rms_norm_random_inputs(dtype: torch.dtype, hidden: int) -> None:
    """Random inputs: only the fp32 sum of squares can differ (another reduction
    order), which moves fp32 outputs by a few ulp. Measured over 900 rows: fp32 at
    most 4 ulp (9.5e-7) on ~20% of the elements, bf16 identical."""
    gen = _gen(1 + hidden)
    x = (3 * torch.randn(5, hidden, generator=gen)).to(dtype)
    weight = _weight(hidden, gen, dtype)
    out, ref = rms_norm(x, weight, EPS), _ref_norm(x, weight)
    assert _ulps(out, ref) <= NORM_ULPS[dtype]
    assert (out != ref).float().mean().item() < (0.5 if dtype == torch.float32 else 0.01)


def test_rms_norm_mixed_and_half_dtypes() -> None:
    """The weight's dtype promotes the output as in torch (fp32 weight on bf16 rows);
    fp16 rounds to nearest even as well."""
    gen = _gen(2)
    x = _summable((3, 256), gen, torch.bfloat16)
    w32 = _weight(256, gen, torch.float32)
    out = rms_norm(x, w32, EPS)
    assert out.dtype == torch.float32
    assert torch.equal(out, _ref_norm(x, w32))
    x16 = _summable((3, 256), gen, torch.float16)
    w16 = _weight(256, gen, torch.float16)
    assert torch.equal(rms_norm(x16, w16, EPS), _ref_norm(x16, w16))


def test_bf16_rounding_is_to_nearest_even() -> None:
    """Products landing exactly halfway between two bf16 values (the interpreter's own
    fp32 -> bf16 cast truncates, the kernels must not)."""
    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    # three 1.5s, five 0.5s and 56 ones: mean square exactly 1, so normed == x, and
    # 1.5 * (1 + k * 2**-7) is a tie for odd k (below 2)
    base = torch.ones(64)
    base[:3], base[3:8] = 1.5, 0.5
    rows = [base.roll(shift) for shift in range(0, 64, 3)]
    x = torch.stack([*rows, -rows[1]]).to(torch.bfloat16)  # (23, 64)
    weight = torch.tensor([1 + k * one_ulp for k in range(64)], dtype=torch.bfloat16)
    out = rms_norm(x, weight, 0.0)
    assert torch.equal(out, _ref_norm(x, weight, 0.0))
    # the rotary products: 1.5 * (1 + 2**-7) is a tie too; 0.3 and 0.7 are rounded
    # from the fp32 tables first
    q = torch.full((1, 1, 4), 1.5, dtype=torch.bfloat16)
    k = torch.tensor([[[1.5, -1.5, 1 + one_ulp, 3.0]]], dtype=torch.bfloat16)
    rot = RotaryEmbedding(4, 1, 1.0)
    rot.cos_cache = torch.tensor([[1 + one_ulp, 0.3]])  # (1, 2) float32
    rot.sin_cache = torch.tensor([[0.7, 1 - one_ulp / 2]])
    pos = torch.zeros(1, dtype=torch.int64)
    got = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, None, None, EPS)
    want = rot(pos, q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------- fused_add_rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype: torch.dtype) -> None:
    gen = _gen(3)
    x = _summable((4, HIDDEN), gen, dtype)
    residual = _summable((4, HIDDEN), gen, dtype)
    x_before, res_before = x.clone(), residual.clone()
    weight = _weight(HIDDEN, gen, dtype)
    normed, res_out = fused_add_rms_norm(x, residual, weight, EPS)
    ref_sum = x_before + res_before
    assert res_out is residual  # the sum is written in place
    assert torch.equal(residual, ref_sum)
    assert torch.equal(x, x_before)
    assert torch.equal(normed, _ref_norm(ref_sum, weight))
    assert not torch.equal(fused_add_rms_norm(x, res_before.clone(), weight, 1e-1)[0], normed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_random_inputs(dtype: torch.dtype) -> None:
    """The add rounds like torch's (bitwise even on random inputs); the norm is
    within the RMSNorm tolerance."""
    gen = _gen(4)
    x = (2 * torch.randn(3, HIDDEN, generator=gen)).to(dtype)
    residual = (5 * torch.randn(3, HIDDEN, generator=gen)).to(dtype)
    ref_sum = x + residual
    weight = _weight(HIDDEN, gen, dtype)
    normed, _ = fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, ref_sum)
    assert _ulps(normed, _ref_norm(ref_sum, weight)) <= NORM_ULPS[dtype]


# ------------------------------------------------------------------------- qk_norm_rope


def _fused_qkv(
    num_tokens: int, n_heads: int, n_kv: int, head_dim: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v views of a fused (T, (n_heads + 2 n_kv) * hd) projection output."""
    q_size, kv_size = n_heads * head_dim, n_kv * head_dim
    q = x[:, :q_size].view(num_tokens, n_heads, head_dim)
    k = x[:, q_size : q_size + kv_size].view(num_tokens, n_kv, head_dim)
    v = x[:, q_size + kv_size :].view(num_tokens, n_kv, head_dim)
    return q, k, v


def _ref_qk(
    rot: RotaryEmbedding,
    pos: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q_weight is not None and k_weight is not None:
        q, k = _ref_norm(q, q_weight, eps), _ref_norm(k, k_weight, eps)
    return rot(pos, q, k)


# (T, n_heads, n_kv, head_dim): Qwen3-0.6B; heads not filling a block and a head_dim
# whose half is not a power of two
QK_SHAPES = [(3, N_HEADS, N_KV, HEAD_DIM), (2, 5, 3, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QK_SHAPES)
@pytest.mark.parametrize("norm", [False, True])
def test_qk_norm_rope_bitwise(dtype: torch.dtype, shape: tuple[int, ...], norm: bool) -> None:
    """Non-contiguous q/k views of a fused qkv output, unsorted positions; the norm
    on exactly summable inputs, the plain rotary on random ones: both bitwise."""
    num_tokens, n_heads, n_kv, head_dim = shape
    gen = _gen(5 + head_dim)
    width = (n_heads + 2 * n_kv) * head_dim
    if norm:
        fused = _summable((num_tokens, width), gen, dtype)
    else:
        fused = (3 * torch.randn(num_tokens, width, generator=gen)).to(dtype)
    q, k, _ = _fused_qkv(num_tokens, n_heads, n_kv, head_dim, fused)
    assert not q.is_contiguous() and not k.is_contiguous()
    rot = RotaryEmbedding(head_dim, 4096, 1_000_000.0)
    pos = torch.tensor([4000, 0, 17][:num_tokens])
    weights = (
        (_weight(head_dim, gen, dtype), _weight(head_dim, gen, dtype)) if norm else (None, None)
    )
    q_out, k_out = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, *weights, EPS)
    q_ref, k_ref = _ref_qk(rot, pos, q, k, *weights)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_out, k_ref)
    # the test can fail: positions matter, and so does eps when there is a norm
    q_swapped, _ = qk_norm_rope(q, k, pos.flip(0), rot.cos_cache, rot.sin_cache, *weights, EPS)
    assert not torch.equal(q_swapped, q_ref)
    if norm:
        _, k_eps = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, *weights, 1e-1)
        assert not torch.equal(k_eps, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_random_inputs(dtype: torch.dtype) -> None:
    """With the norm on random inputs only its sum of squares can differ; the rotation
    can turn one ulp of a normed value into a larger relative error of a small output,
    so the bound is absolute: a 2**-21 (fp32) or 2**-7 (bf16) fraction of the largest
    output. Measured over 40 tokens: fp32 9.5e-7 at outputs up to 6.2, bf16 identical."""
    gen = _gen(6)
    fused = (2 * torch.randn(4, (N_HEADS + 2 * N_KV) * HEAD_DIM, generator=gen)).to(dtype)
    q, k, _ = _fused_qkv(4, N_HEADS, N_KV, HEAD_DIM, fused)
    rot = RotaryEmbedding(HEAD_DIM, 2048, 1_000_000.0)
    pos = torch.tensor([9, 2047, 3, 500])
    weights = (_weight(HEAD_DIM, gen, dtype), _weight(HEAD_DIM, gen, dtype))
    got = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, *weights, EPS)
    want = _ref_qk(rot, pos, q, k, *weights)
    rel = 2.0**-21 if dtype == torch.float32 else 2.0**-7
    for out, ref in zip(got, want, strict=True):
        atol = rel * ref.abs().max().item()
        torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_qk_norm_rope_in_place() -> None:
    """``inplace=True`` rotates the q and k slices of the fused tensor, leaving v alone."""
    gen = _gen(7)
    dtype = torch.bfloat16
    fused = _summable((3, (N_HEADS + 2 * N_KV) * HEAD_DIM), gen, dtype)
    before = fused.clone()
    q, k, v = _fused_qkv(3, N_HEADS, N_KV, HEAD_DIM, fused)
    rot = RotaryEmbedding(HEAD_DIM, 64, 10_000.0)
    pos = torch.tensor([5, 63, 1])
    weights = (_weight(HEAD_DIM, gen, dtype), _weight(HEAD_DIM, gen, dtype))
    q_ref, k_ref = _ref_qk(rot, pos, q.clone(), k.clone(), *weights)
    q_out, k_out = qk_norm_rope(
        q, k, pos, rot.cos_cache, rot.sin_cache, *weights, EPS, inplace=True
    )
    assert q_out is q and k_out is k
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(v, _fused_qkv(3, N_HEADS, N_KV, HEAD_DIM, before)[2])


def test_qk_norm_rope_rejects_bad_arguments() -> None:
    q = torch.zeros(2, 4, 8)
    k = torch.zeros(2, 2, 8)
    pos = torch.zeros(2, dtype=torch.int64)
    cos = sin = torch.zeros(16, 4)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope(q, k, pos, cos, sin, w, None, EPS)
    with pytest.raises(ValueError, match="cos_cache"):
        qk_norm_rope(q, k, pos, cos[:, :3], sin, None, None, EPS)
    with pytest.raises(ValueError, match="even"):
        qk_norm_rope(q[..., :7], k[..., :7], pos, cos, sin, None, None, EPS)


# ---------------------------------------------------------------- qk_norm_rope_write_kv


def _cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8) if cache.element_size() == 1 else cache


# (model dtype, norm weight dtype, cache dtype, k_scale, v_scale): a cache in the rotated
# keys' dtype, fp8 with unit scales and with scales that matter (keys beyond 448 before
# scaling, values in fp8's subnormals without it), and an fp32-weighted norm whose fp32
# keys go to a bf16 cache through the separate write kernel
WRITE_CASES = [
    (torch.float32, torch.float32, torch.float32, 1.0, 1.0),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 1.0, 1.0),
    (torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 1.0, 1.0),
    (torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 4.0, 2e-5),
    (torch.float32, torch.float32, torch.float8_e4m3fn, 0.5, 3e-3),
    (torch.bfloat16, torch.float32, torch.bfloat16, 1.0, 1.0),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("shape", QK_SHAPES)
@pytest.mark.parametrize("norm", [False, True])
def test_qk_norm_rope_write_kv_matches_separate_kernels(
    case: tuple, shape: tuple[int, ...], norm: bool
) -> None:
    """One launch stores the bytes that ``qk_norm_rope`` then ``triton_write_kv`` store
    (and the torch reference ``write_kv`` of those keys), returns the same q, writes
    nothing at a padding token's slot (-1) and leaves every other slot alone."""
    dtype, w_dtype, cache_dtype, k_scale, v_scale = case
    num_tokens, n_heads, n_kv, head_dim = shape
    gen = _gen(11 + head_dim)
    width = (n_heads + 2 * n_kv) * head_dim
    fused = (3 * torch.randn(num_tokens, width, generator=gen)).to(dtype)
    if k_scale != 1.0:  # keys up to ~2000, values around 1e-3
        fused[:, n_heads * head_dim :] *= 300
        fused[:, (n_heads + n_kv) * head_dim :] /= 3e5
    q, k, v = _fused_qkv(num_tokens, n_heads, n_kv, head_dim, fused)
    rot = RotaryEmbedding(head_dim, 4096, 1_000_000.0)
    pos = torch.tensor([4000, 0, 17][:num_tokens])
    slots = torch.tensor([9, -1, 2][:num_tokens])
    weights = (
        (_weight(head_dim, gen, w_dtype), _weight(head_dim, gen, w_dtype)) if norm else (None, None)
    )
    # 3 blocks of 4 slots, filled with a pattern the kernels must not touch
    init = torch.randn(2, 3, 4, n_kv, head_dim, generator=gen).to(cache_dtype)
    got_cache, sep_cache, ref_cache = init.clone(), init.clone(), init.clone()

    q_out = qk_norm_rope_write_kv(
        q, k, v, pos, rot.cos_cache, rot.sin_cache, *weights, EPS,
        got_cache, slots, k_scale, v_scale,
    )  # fmt: skip
    q_sep, k_sep = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, *weights, EPS)
    triton_write_kv(k_sep, v, sep_cache, slots, k_scale, v_scale)
    keep = slots >= 0  # the torch reference of the write has no padding slots
    if cache_dtype != torch.float8_e4m3fn:  # nor casts into a cache of another dtype
        k_sep, v = k_sep.to(cache_dtype), v.to(cache_dtype)
    write_kv(k_sep[keep], v[keep], ref_cache, slots[keep], k_scale, v_scale)

    assert q_out.is_contiguous() and q_out.shape == q.shape
    assert torch.equal(q_out, q_sep)
    assert torch.equal(_cache_bytes(got_cache), _cache_bytes(sep_cache))
    assert torch.equal(_cache_bytes(got_cache), _cache_bytes(ref_cache))
    # the written slots changed, and only those (slot 9 is block 2, position 1)
    changed = (_cache_bytes(got_cache) != _cache_bytes(init)).flatten(3).any(-1)  # (2, 3, 4)
    written = {9, 2} if num_tokens > 2 else {9}
    for s_ in range(12):
        assert bool(changed[:, s_ // 4, s_ % 4].all()) == (s_ in written), s_


def test_qk_norm_rope_write_kv_rejects_bad_arguments() -> None:
    q = torch.zeros(2, 4, 8)
    k = v = torch.zeros(2, 2, 8)
    pos = torch.zeros(2, dtype=torch.int64)
    cos = sin = torch.zeros(16, 4)
    cache = torch.zeros(2, 3, 4, 2, 8)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"v .* does not match k"):
        qk_norm_rope_write_kv(q, k, v[:, :1], pos, cos, sin, None, None, EPS, cache, slots)
    with pytest.raises(ValueError, match=r"kv_cache .* does not match k"):
        qk_norm_rope_write_kv(q, k, v, pos, cos, sin, None, None, EPS, cache[..., :4], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_write_kv(q, k, v, pos, cos, sin, None, None, EPS, cache, slots[:1])
    with pytest.raises(ValueError, match="scale"):  # scales other than 1 need an fp8 cache
        qk_norm_rope_write_kv(q, k, v, pos, cos, sin, None, None, EPS, cache, slots, 2.0)


# ------------------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [INTER, 20])
def test_silu_and_mul(dtype: torch.dtype, inter: int) -> None:
    """``tl.exp`` is not torch's exp: fp32 within 8 ulp (measured over 300k elements:
    4 ulp, 3.8e-6, on 16% of them), bf16 within 1 ulp (measured: identical)."""
    gen = _gen(8 + inter)
    wide = (3 * torch.randn(3, 2 * inter + 6, generator=gen)).to(dtype)
    gate_up = wide[:, 6:]  # (3, 2 * inter), row stride 2 * inter + 6
    out = silu_and_mul(gate_up)
    ref = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert out.shape == (3, inter) and out.dtype == dtype and out.is_contiguous()
    assert _ulps(out, ref) <= (8 if dtype == torch.float32 else 1)
    # the test can fail: gate and up swapped
    swapped = F.silu(gate_up[:, inter:]) * gate_up[:, :inter]
    assert _ulps(out, swapped) > 100


# --------------------------------------------------------------------------- edge cases


def test_empty_batches() -> None:
    gen = _gen(9)
    w = _weight(HIDDEN, gen, torch.bfloat16)
    x = torch.empty(0, HIDDEN, dtype=torch.bfloat16)
    assert rms_norm(x, w, EPS).shape == (0, HIDDEN)
    normed, res = fused_add_rms_norm(x, x.clone(), w, EPS)
    assert normed.shape == (0, HIDDEN) and res.shape == (0, HIDDEN)
    assert silu_and_mul(torch.empty(0, 2 * INTER, dtype=torch.bfloat16)).shape == (0, INTER)
    rot = RotaryEmbedding(HEAD_DIM, 16, 10_000.0)
    q = torch.empty(0, N_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    k = torch.empty(0, N_KV, HEAD_DIM, dtype=torch.bfloat16)
    pos = torch.empty(0, dtype=torch.int64)
    hw = _weight(HEAD_DIM, gen, torch.bfloat16)
    q_out, k_out = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, hw, hw, EPS)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_fp8_rows_matches_torch(dtype: torch.dtype) -> None:
    from lmfleet.engine.layers.quant import _MIN_SCALE, FP8_MAX, _quantize_fp8_rows_torch

    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(6, 1000, generator=gen) * torch.logspace(-3, 2, 6).unsqueeze(1)).to(dtype)
    x[3] = 0.0  # an all-zero row takes the minimum scale
    x[4, 17] = 5000.0  # one outlier sets the row's scale
    strided = torch.zeros(6, 1200, dtype=dtype)
    strided[:, :1000] = x
    q, scale = triton_fused.quantize_fp8_rows(strided[:, :1000], FP8_MAX, _MIN_SCALE)
    q_ref, scale_ref = _quantize_fp8_rows_torch(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 1000) and scale.shape == (6, 1)
    assert torch.equal(scale, scale_ref)  # amax and one correctly rounded division
    assert scale[3].item() == torch.tensor(_MIN_SCALE).item()  # the fp32 minimum
    assert q[3].float().abs().max().item() == 0.0
    got = q.float()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # the same bytes
    assert got.abs().max().item() == FP8_MAX  # every row's largest element maps to ±448


def test_missing_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton the module still imports; calling a kernel raises TritonUnavailable."""
    monkeypatch.setitem(sys.modules, "triton", None)
    triton_fused._kernels.cache_clear()
    try:
        with pytest.raises(TritonUnavailable):
            rms_norm(torch.ones(1, 8), torch.ones(8), EPS)
    finally:
        triton_fused._kernels.cache_clear()


# -------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_cuda_matches_torch(num_tokens: int) -> None:
    """The compiled kernels against the eager torch layers on the GPU, bf16: reductions,
    rsqrt and exp differ from torch's CUDA kernels, so at most one bf16 ulp (the rotary
    outputs: a 2**-7 fraction of the largest output) on a small share of the elements."""
    dtype, dev = torch.bfloat16, "cuda"
    gen = _gen(10)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype).to(dev)
    residual = (4 * torch.randn(num_tokens, HIDDEN, generator=gen)).to(dtype).to(dev)
    w = _weight(HIDDEN, gen, dtype).to(dev)

    out, ref = rms_norm(x, w, EPS), _ref_norm(x, w)
    assert _ulps(out, ref) <= 1 and (out != ref).float().mean().item() < 0.01
    ref_sum = x + residual
    normed, _ = fused_add_rms_norm(x, residual, w, EPS)
    assert torch.equal(residual, ref_sum)
    assert _ulps(normed, _ref_norm(ref_sum, w)) <= 1

    fused = torch.randn(num_tokens, (N_HEADS + 2 * N_KV) * HEAD_DIM, generator=gen)
    q, k, _ = _fused_qkv(num_tokens, N_HEADS, N_KV, HEAD_DIM, fused.to(dtype).to(dev))
    rot = RotaryEmbedding(HEAD_DIM, 4096, 1_000_000.0, device=dev)
    pos = torch.randint(0, 4096, (num_tokens,), generator=gen).to(dev)
    hw = (_weight(HEAD_DIM, gen, dtype).to(dev), _weight(HEAD_DIM, gen, dtype).to(dev))
    plain = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, None, None, EPS)
    for got, want in zip(plain, rot(pos, q, k), strict=True):
        assert torch.equal(got, want)
    got_qk = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, *hw, EPS)
    for got, want in zip(got_qk, _ref_qk(rot, pos, q, k, *hw), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2.0**-7 * want.abs().max().item())

    gate_up = (3 * torch.randn(num_tokens, 2 * INTER, generator=gen)).to(dtype).to(dev)
    out = silu_and_mul(gate_up)
    ref = F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]
    assert _ulps(out, ref) <= 1 and (out != ref).float().mean().item() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture() -> None:
    """All four launch fixed grids without host syncs: a captured graph replays them
    on new inputs and gives what eager launches give."""
    dtype, dev, num_tokens = torch.bfloat16, "cuda", 4
    gen = _gen(11)
    w = _weight(HIDDEN, gen, dtype).to(dev)
    hw = _weight(HEAD_DIM, gen, dtype).to(dev)
    rot = RotaryEmbedding(HEAD_DIM, 256, 1_000_000.0, device=dev)
    x = torch.randn(num_tokens, HIDDEN, device=dev).to(dtype)
    residual = torch.randn(num_tokens, HIDDEN, device=dev).to(dtype)
    fused = torch.randn(num_tokens, (N_HEADS + 2 * N_KV) * HEAD_DIM, device=dev).to(dtype)
    gate_up = torch.randn(num_tokens, 2 * INTER, device=dev).to(dtype)
    pos = torch.arange(num_tokens, device=dev)

    def step() -> list[torch.Tensor]:
        q, k, _ = _fused_qkv(num_tokens, N_HEADS, N_KV, HEAD_DIM, fused)
        res = residual.clone()
        normed, res = fused_add_rms_norm(x, res, w, EPS)
        qo, ko = qk_norm_rope(q, k, pos, rot.cos_cache, rot.sin_cache, hw, hw, EPS)
        return [rms_norm(x, w, EPS), normed, res, qo, ko, silu_and_mul(gate_up)]

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (x, residual, fused, gate_up):
        t.copy_(torch.randn(t.shape, device=dev).to(dtype))
    pos.copy_(torch.tensor([200, 3, 99, 0], device=dev))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step(), strict=True):
        assert torch.equal(got, want)
