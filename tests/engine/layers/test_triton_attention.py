"""The Triton paged-attention kernels against the CPU reference ``paged_attention``.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is imported); the file skips when Triton is not installed. Tests marked
``gpu`` run the compiled kernels on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lmfleet.engine.layers.attention import paged_attention, to_fp8
from lmfleet.engine.layers.triton_attention import (
    attention_backend,
    fp8_kv_supported,
    triton_available,
    triton_paged_attention,
    triton_write_kv,
)
from tests.engine.layers.paged_kv import BlockLayout

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


class _Twin:
    """Two copies of one shuffled paged cache, poisoned with NaN: the reference
    backend writes into one, the Triton backend into the other, step by step."""

    def __init__(
        self,
        *,
        n_heads: int,
        n_kv: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = DEVICE,
        num_blocks: int = 48,
        seed: int = 0,
        kv_dtype: torch.dtype | None = None,
        kv_scales: tuple[float, float] = (1.0, 1.0),
        mult: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.kv_scales = kv_scales
        #: Q, K and V are drawn as randn times these
        self.mult = mult
        self.dtype, self.device = dtype, device
        self.layout = BlockLayout(num_blocks, block_size, seed=seed)
        shape = (2, num_blocks, block_size, n_kv, head_dim)
        kv_dtype = kv_dtype or dtype
        self.ref_cache = torch.full(shape, float("nan"), dtype=kv_dtype)
        self.cache = torch.full(shape, float("nan"), dtype=kv_dtype, device=device)
        self.gen = torch.Generator().manual_seed(seed)
        self.done: dict[int, int] = {}

    def step(self, entries: list[tuple[int, int]]) -> float:
        """Run ``(seq, new tokens)`` as one batch through both; return the relative error."""
        steps = []
        for seq, n in entries:
            done = self.done.get(seq, 0)
            steps.append((seq, n, done + n))
            self.done[seq] = done + n
        total = sum(n for _, n in entries)
        meta = self.layout.metadata(steps)

        def rand(h: int, mult: float) -> torch.Tensor:
            x = torch.randn(total, h, self.head_dim, generator=self.gen) * mult
            return x.to(self.dtype)

        q_mult, k_mult, v_mult = self.mult
        q, k, v = rand(self.n_heads, q_mult), rand(self.n_kv, k_mult), rand(self.n_kv, v_mult)
        scale = self.head_dim**-0.5
        ref = paged_attention(q, k, v, self.ref_cache, meta, scale, *self.kv_scales)
        dev_meta = _to_device(meta, self.device)
        d = self.device
        out = triton_paged_attention(
            q.to(d), k.to(d), v.to(d), self.cache, dev_meta, scale, *self.kv_scales
        )
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert not out.isnan().any()
        # the written slots agree bit for bit; the rest stays poisoned
        slots = meta.slot_mapping
        flat = self.cache.view(2, -1, self.n_kv, self.head_dim).cpu()
        ref_flat = self.ref_cache.view(2, -1, self.n_kv, self.head_dim)
        if self.cache.element_size() == 1:  # compare fp8 as its bytes
            flat, ref_flat = flat.view(torch.uint8), ref_flat.view(torch.uint8)
        torch.testing.assert_close(flat[:, slots], ref_flat[:, slots], rtol=0, atol=0)
        return _rel_err(out.cpu(), ref)


def _to_device(meta, device: str):
    from dataclasses import replace

    return replace(
        meta,
        slot_mapping=meta.slot_mapping.to(device),
        query_start_loc=meta.query_start_loc.to(device),
        seq_lens=meta.seq_lens.to(device),
        block_tables=meta.block_tables.to(device),
    )


#: fp32 goes through exact products; bf16 inputs with fp32 softmax
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _scenario(twin: _Twin) -> list[float]:
    """Prefill from 0, then chunked prefill over cached context mixed with decodes
    and a new prompt, then pure decode, then a long chunk over a long context."""
    errs = [twin.step([(0, 37), (1, 5), (2, 1)])]  # prefill from 0 (one of length 1)
    errs.append(twin.step([(0, 1), (1, 20), (3, 30), (2, 1)]))  # mixed
    errs.append(twin.step([(0, 1), (1, 1), (2, 1), (3, 1)]))  # decode only
    errs.append(twin.step([(3, 45), (0, 1)]))  # a chunk over 31 cached tokens
    return errs


def _short_scenario(twin: _Twin) -> list[float]:
    errs = [twin.step([(0, 19), (1, 2)])]
    errs.append(twin.step([(0, 1), (1, 15), (2, 3)]))
    errs.append(twin.step([(0, 1), (1, 1), (2, 1)]))
    return errs


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_gqa(block_size: int, dtype: torch.dtype) -> None:
    twin = _Twin(n_heads=8, n_kv=2, head_dim=32, block_size=block_size, dtype=dtype)
    errs = _scenario(twin)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"),
    [(4, 4, 16), (6, 2, 64), (16, 8, 128)],  # MHA, a group of 3, Qwen3-0.6B's shape
)
def test_head_layouts(n_heads: int, n_kv: int, head_dim: int) -> None:
    twin = _Twin(
        n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, block_size=16, dtype=torch.float32, seed=1
    )
    errs = _short_scenario(twin)
    assert max(errs) < TOL[torch.float32], errs


def test_many_decodes_mixed_with_one_chunk() -> None:
    """More sequences than one query block: the binary search over query_start_loc."""
    twin = _Twin(n_heads=4, n_kv=2, head_dim=16, block_size=16, dtype=torch.float32, num_blocks=96)
    twin.step([(s, 1 + s) for s in range(12)])
    errs = [twin.step([(s, 1) for s in range(12)] + [(12, 33)])]
    errs.append(twin.step([(s, 1) for s in range(13)]))
    assert max(errs) < TOL[torch.float32], errs


def test_write_kv_skips_negative_slots() -> None:
    cache = torch.full((2, 4, 16, 2, 16), float("nan"), device=DEVICE)
    k = torch.randn(3, 2, 16, device=DEVICE)
    v = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.tensor([5, -1, 40], device=DEVICE)
    triton_write_kv(k, v, cache, slots)
    flat = cache.view(2, -1, 2, 16)
    torch.testing.assert_close(flat[0, 5], k[0])
    torch.testing.assert_close(flat[1, 40], v[2])
    assert flat[0].isnan().all(dim=(1, 2)).sum() == 64 - 2


def test_write_kv_reads_strided_views() -> None:
    """k/v as slices of one fused qkv output (token stride larger than n_kv * hd)."""
    qkv = torch.randn(5, 3 * 2 * 16, device=DEVICE)
    k = qkv[:, 32:64].view(5, 2, 16)
    v = qkv[:, 64:].view(5, 2, 16)
    cache = torch.zeros(2, 2, 16, 2, 16, device=DEVICE)
    triton_write_kv(k, v, cache, torch.arange(5, device=DEVICE) + 7)
    flat = cache.view(2, -1, 2, 16)
    torch.testing.assert_close(flat[0, 7:12], k)
    torch.testing.assert_close(flat[1, 7:12], v)


def test_backend_selection() -> None:
    assert attention_backend("cpu") is paged_attention
    assert attention_backend("cpu", "triton") is triton_paged_attention
    assert triton_available()
    with pytest.raises(ValueError, match="backend"):
        attention_backend("cpu", "flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_matches_reference(dtype: torch.dtype) -> None:
    """An fp8 cache under model-dtype queries: the kernels write the same bytes as the
    reference's saturating cast and attend over them as the reference does."""
    twin = _Twin(
        n_heads=8, n_kv=2, head_dim=32, block_size=16, dtype=dtype, kv_dtype=torch.float8_e4m3fn
    )
    errs = _scenario(twin)
    assert max(errs) < TOL[dtype], errs
    assert twin.cache.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_with_scales_matches_reference(dtype: torch.dtype) -> None:
    """Keys of about +-600 and values of about 1e-3 stored with scales 4.0 and 2e-5:
    the kernels store the reference's bytes (the same fp32 multiply by the inverse
    scale) and fold the scales into the softmax scale and the output, as close to the
    reference as with unit scales. Covers prefill, chunks, mixed and decode steps."""
    twin = _Twin(
        n_heads=8,
        n_kv=2,
        head_dim=32,
        block_size=16,
        dtype=dtype,
        kv_dtype=torch.float8_e4m3fn,
        kv_scales=(4.0, 2e-5),
        mult=(1 / 600, 600.0, 1e-3),
    )
    errs = _scenario(twin)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_write_saturates(dtype: torch.dtype) -> None:
    """Values beyond +-448 (and inf) store +-448; fp8 subnormals and values that round
    to zero store torch's bytes, the sign of a zero included."""
    cache = torch.full((2, 2, 16, 2, 16), float("nan"), dtype=torch.float8_e4m3fn, device=DEVICE)
    k = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(5)) * 300
    k[0, 0, :3] = torch.tensor([1e4, -1e4, float("inf")])  # many others are beyond +-448 too
    k[0, 1, :2] = torch.tensor([0.3, -0.3])  # v = -+3e-4: rounds to -0 and +0
    k, v = k.to(DEVICE, dtype), (-k / 1000).to(DEVICE, dtype)  # v: fp8 subnormals
    triton_write_kv(k, v, cache, torch.tensor([3, 17, 30], device=DEVICE))
    flat = cache.view(2, -1, 2, 16).cpu()
    for i, (got, want) in enumerate(((flat[0], k), (flat[1], v))):
        got, want = got[[3, 17, 30]].view(torch.uint8), to_fp8(want.cpu()).view(torch.uint8)
        assert torch.equal(got, want), i
    assert flat[0, 3, 0, :3].float().tolist() == [448.0, -448.0, 448.0]
    assert flat[1, 3, 1, :2].view(torch.uint8).tolist() == [0x80, 0x00]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp8_cache_matches_reference(dtype: torch.dtype) -> None:
    if not fp8_kv_supported("cuda"):
        pytest.skip("fp8 needs compute capability 8.9+")
    twin = _Twin(
        n_heads=16,
        n_kv=8,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        device="cuda",
        kv_dtype=torch.float8_e4m3fn,
    )
    errs = _scenario(twin)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cuda_matches_reference(dtype: torch.dtype, block_size: int) -> None:
    twin = _Twin(
        n_heads=16, n_kv=8, head_dim=128, block_size=block_size, dtype=dtype, device="cuda"
    )
    errs = _scenario(twin)
    assert max(errs) < TOL[dtype], errs
