"""The split-K Triton decode kernel against the CPU reference ``paged_attention``.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is imported); the file skips when Triton is not installed. Tests marked
``gpu`` run the compiled kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

pytest.importorskip("triton")

from lmfleet.engine.layers.attention import paged_attention, write_kv
from lmfleet.engine.layers.attention_metadata import AttentionMetadata
from lmfleet.engine.layers.triton_decode import decode_num_splits, triton_decode_attention
from tests.engine.layers.paged_kv import BlockLayout

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn

#: fp32 goes through exact products; bf16/fp16 inputs with an fp32 softmax
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _to_device(meta: AttentionMetadata, device: str) -> AttentionMetadata:
    return replace(
        meta,
        slot_mapping=meta.slot_mapping.to(device),
        query_start_loc=meta.query_start_loc.to(device),
        seq_lens=meta.seq_lens.to(device),
        block_tables=meta.block_tables.to(device),
    )


@dataclass
class _Case:
    q: torch.Tensor  # (B, n_heads, hd) on the device, q dtype
    cache: torch.Tensor  # the kernel's cache, on the device, cache dtype
    meta: AttentionMetadata  # the whole batch (padding rows included), on the device
    ref: torch.Tensor  # (B, n_heads, hd) reference output, zeros on padding rows
    live: list[int]  # rows with seq_len > 0
    scale: float
    kv_scales: tuple[float, float] = (1.0, 1.0)  # the fp8 cache's k_scale, v_scale


def _decode_case(
    *,
    seq_lens: list[int],
    n_heads: int = 4,
    n_kv: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    device: str = DEVICE,
    seed: int = 0,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> _Case:
    """A decode step over a shuffled, NaN-poisoned paged cache.

    Sequence ``i`` has ``seq_lens[i]`` tokens after the step (0: a CUDA-graph padding
    row, whose block table points at a poisoned block). The reference writes the
    context and then runs the step through ``paged_attention`` on a ``dtype`` cache;
    the kernel reads a copy of that cache converted to ``cache_dtype``. For fp8 the
    K/V values are fp8-representable, so the reference sees the dequantized cache;
    with ``kv_scales`` the kernel's cache stands for K and V times those, which the
    reference gets by scaling the softmax scale by ``k_scale`` and its output by
    ``v_scale``.
    """
    cache_dtype = cache_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    used = sum(-(-n // block_size) for n in seq_lens)
    num_blocks = used + 3  # spare blocks stay poisoned
    layout = BlockLayout(num_blocks, block_size, seed=seed)
    shape = (2, num_blocks, block_size, n_kv, head_dim)
    ref_cache = torch.full(shape, float("nan"), dtype=dtype)

    def rand(n: int, h: int) -> torch.Tensor:
        x = torch.randn(n, h, head_dim, generator=gen)
        if cache_dtype == FP8:
            x = x.to(FP8)  # representable in the cache
        return x.to(dtype)

    live = [i for i, n in enumerate(seq_lens) if n > 0]
    q = torch.randn(len(seq_lens), n_heads, head_dim, generator=gen).to(dtype)
    k_new, v_new = rand(len(live), n_kv), rand(len(live), n_kv)
    # the context before this step, written by the reference
    for i in live:
        n = seq_lens[i] - 1
        if n:
            ctx = layout.metadata([(i, n, n)])
            write_kv(rand(n, n_kv), rand(n, n_kv), ref_cache, ctx.slot_mapping)
    scale = head_dim**-0.5
    ref = torch.zeros_like(q)
    if live:
        live_meta = layout.metadata([(i, 1, seq_lens[i]) for i in live])
        k_scale, v_scale = kv_scales
        out = paged_attention(q[live], k_new, v_new, ref_cache, live_meta, scale * k_scale)
        ref[live] = (out.double() * v_scale).to(dtype)

    meta = layout.metadata([(i, 1 if n else 0, n) for i, n in enumerate(seq_lens)])
    poisoned = layout.free[0]  # never handed out
    for i, n in enumerate(seq_lens):
        if n == 0:
            meta.block_tables[i] = poisoned
    cache = ref_cache.to(cache_dtype).to(device)
    return _Case(q.to(device), cache, _to_device(meta, device), ref, live, scale, kv_scales)


def _run(case: _Case, num_splits: int | None) -> torch.Tensor:
    k_scale, v_scale = case.kv_scales
    out = triton_decode_attention(
        case.q, case.cache, case.meta, case.scale, num_splits, k_scale=k_scale, v_scale=v_scale
    )
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert out.isfinite().all()
    return out.cpu()


def _check(case: _Case, out: torch.Tensor, tol: float) -> float:
    pad = [i for i in range(out.shape[0]) if i not in case.live]
    assert (out[pad] == 0).all()
    err = _rel_err(out[case.live], case.ref[case.live])
    assert err < tol, err
    return err


# ---------------------------------------------------------------- decode_num_splits


def test_decode_num_splits_fills_the_sms() -> None:
    # batch 1 on an H200 (132 SMs), Qwen3-0.6B's 8 KV heads: capped at 16
    assert decode_num_splits(1, 8, 132) == 16
    assert decode_num_splits(1, 8, 132, max_splits=64) == 33  # 264 programs = 2 waves
    assert decode_num_splits(8, 8, 132) == 5
    assert decode_num_splits(16, 8, 132) == 3
    # the batch alone fills the SMs
    assert decode_num_splits(17, 8, 132) == 1
    assert decode_num_splits(256, 8, 132) == 1
    assert decode_num_splits(0, 8, 132) == 1
    assert decode_num_splits(1, 8, 8) == 1  # the CPU default of 8 "SMs"
    assert decode_num_splits(1, 2, 8) == 8
    prev = 16
    for b in range(1, 40):
        s = decode_num_splits(b, 8, 132)
        assert 1 <= s <= prev  # more sequences never ask for more splits
        if 1 < s < 16:
            assert b * 8 * s >= 2 * 132 > b * 8 * (s - 1)
        prev = s


def test_decode_num_splits_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        decode_num_splits(1, 8, 0)
    with pytest.raises(ValueError):
        decode_num_splits(1, 8, 132, max_splits=0)


# ------------------------------------------------------------ against the reference

#: lengths from 1 up, several below the split counts, a padding row, tile and block edges
SEQ_LENS = [1, 2, 0, 5, 33, 64, 170]
#: every split count for fp32; bf16 skips 2 (the interpreter is slow)
CASES = [(torch.float32, s) for s in (1, 2, 3, 8)] + [(torch.bfloat16, s) for s in (1, 3, 8)]


@pytest.mark.parametrize(("dtype", "num_splits"), CASES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(dtype: torch.dtype, block_size: int, num_splits: int) -> None:
    case = _decode_case(seq_lens=SEQ_LENS, block_size=block_size, dtype=dtype)
    _check(case, _run(case, num_splits), TOL[dtype])


@pytest.mark.parametrize(
    ("dtype", "num_splits"), [(torch.float32, 3), (torch.bfloat16, 2), (torch.bfloat16, None)]
)
def test_qwen3_head_shape(dtype: torch.dtype, num_splits: int | None) -> None:
    """16 query heads over 8 KV heads of 128 dims (Qwen3-0.6B)."""
    case = _decode_case(seq_lens=[1, 0, 150], n_heads=16, n_kv=8, head_dim=128, dtype=dtype, seed=1)
    _check(case, _run(case, num_splits), TOL[dtype])


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"),
    [(4, 4, 16), (6, 2, 64), (32, 2, 16)],  # MHA, a group of 3, a group of 16
)
def test_head_layouts(n_heads: int, n_kv: int, head_dim: int) -> None:
    case = _decode_case(seq_lens=[3, 40, 97], n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, seed=2)
    _check(case, _run(case, 2), TOL[torch.float32])


def test_split_counts_agree() -> None:
    """The combine is exact up to fp32 rounding, whatever the split count."""
    case = _decode_case(seq_lens=[2, 161], seed=3)
    outs = [_run(case, s) for s in (1, 5, 16)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_padding_rows_give_zeros() -> None:
    """seq_len 0 rows (CUDA-graph padding) read nothing: their table points at NaN."""
    case = _decode_case(seq_lens=[0, 0, 0], seed=4)
    out = _run(case, 3)
    assert (out == 0).all()


def test_fp16_queries() -> None:
    case = _decode_case(seq_lens=[1, 33, 150], dtype=torch.float16, seed=5)
    _check(case, _run(case, 3), TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache(dtype: torch.dtype, num_splits: int) -> None:
    """K/V stored as float8_e4m3fn (scale 1.0) against the reference on the
    dequantized cache; the fp32 products make fp32 queries exact."""
    case = _decode_case(
        seq_lens=[1, 0, 2, 45, 129], dtype=dtype, cache_dtype=FP8, seed=6, block_size=32
    )
    assert case.cache.dtype == FP8
    _check(case, _run(case, num_splits), TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_with_scales(num_splits: int) -> None:
    """k_scale folds into the softmax scale, v_scale into the output: in the split
    kernel's own normalisation (one split) and in the combine kernel (three)."""
    case = _decode_case(
        seq_lens=[1, 0, 2, 45, 129],
        dtype=torch.bfloat16,
        cache_dtype=FP8,
        seed=6,
        block_size=32,
        kv_scales=(0.375, 3.0),
    )
    _check(case, _run(case, num_splits), TOL[torch.bfloat16])
    unscaled = _run(replace(case, kv_scales=(1.0, 1.0)), num_splits)
    assert _rel_err(unscaled[case.live], case.ref[case.live]) > 0.5  # the scales matter


def test_rejects_bad_inputs() -> None:
    case = _decode_case(seq_lens=[3, 5], seed=7)
    with pytest.raises(ValueError, match="one query per sequence"):
        triton_decode_attention(case.q[:1], case.cache, case.meta, case.scale)
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode_attention(case.q, case.cache, case.meta, case.scale, 0)
    with pytest.raises(ValueError, match="kv_cache"):
        triton_decode_attention(case.q, case.cache[0], case.meta, case.scale)


def test_empty_batch() -> None:
    case = _decode_case(seq_lens=[3], seed=8)
    meta = replace(
        case.meta, seq_lens=case.meta.seq_lens[:0], block_tables=case.meta.block_tables[:0]
    )
    out = triton_decode_attention(case.q[:0], case.cache, meta, case.scale)
    assert out.shape == (0, 4, 32)


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.bfloat16, FP8),
    ],
)
@pytest.mark.parametrize("num_splits", [1, 7, None])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cuda_matches_reference(
    dtype: torch.dtype, cache_dtype: torch.dtype | None, num_splits: int | None, block_size: int
) -> None:
    case = _decode_case(
        seq_lens=[1, 0, 17, 300, 2049, 4000],
        n_heads=16,
        n_kv=8,
        head_dim=128,
        block_size=block_size,
        dtype=dtype,
        cache_dtype=cache_dtype,
        device="cuda",
    )
    _check(case, _run(case, num_splits), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_follows_seq_lens() -> None:
    """Captured once, replayed with other lengths and tables in the same buffers."""
    short = _decode_case(seq_lens=[5, 0, 40], n_heads=16, n_kv=8, head_dim=128, device="cuda")
    long = _decode_case(
        seq_lens=[700, 33, 0], n_heads=16, n_kv=8, head_dim=128, device="cuda", seed=9
    )
    q = short.q.clone()
    cache = torch.zeros(
        (2, max(short.cache.shape[1], long.cache.shape[1]), *short.cache.shape[2:]),
        device="cuda",
    )
    width = max(short.meta.block_tables.shape[1], long.meta.block_tables.shape[1])
    tables = torch.zeros(3, width, dtype=torch.int32, device="cuda")
    meta = replace(short.meta, block_tables=tables, seq_lens=short.meta.seq_lens.clone())

    def load(case: _Case) -> None:
        q.copy_(case.q)
        cache.zero_()
        cache[:, : case.cache.shape[1]].copy_(case.cache)
        tables.zero_()
        tables[:, : case.meta.block_tables.shape[1]].copy_(case.meta.block_tables)
        meta.seq_lens.copy_(case.meta.seq_lens)

    load(short)
    triton_decode_attention(q, cache, meta, short.scale, 4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_decode_attention(q, cache, meta, short.scale, 4)
    for case in (short, long):
        load(case)
        graph.replay()
        torch.cuda.synchronize()
        _check(case, out.cpu(), TOL[torch.float32])
