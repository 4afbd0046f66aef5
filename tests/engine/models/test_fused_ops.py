"""The decoder with fused projections and the fused Triton kernels (norms, residual
adds, q/k norm + rotary, silu-and-multiply) against the plain torch modules.

On CPU the kernels run in Triton's interpreter. The checkpoint is the session's tiny
Llama and a tiny Qwen3 (per-head q/k norm); prompts go through a prefill chunk, a
second chunk over the cached prefix and decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lmfleet.engine.layers.triton_attention import triton_attend, triton_paged_attention
from lmfleet.engine.layers.triton_fused import triton_fused_ops
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.models.presets import PRESETS, Preset, create_model
from tests.engine.layers.paged_kv import BlockLayout, positions_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(model, arch, dtype, fused: bool, caches: list[torch.Tensor] | None = None):
    """Float32 logits of every token of two sequences: chunk 1 (both), chunk 2 with a
    cached prefix and a one-token decode (mixed), then a decode step of both. Writes
    into ``caches`` when given (default: zeroed caches in ``dtype``)."""
    model.set_fused_ops(triton_fused_ops() if fused else None)
    layout = BlockLayout(24, 16, seed=3)
    shape = (2, 24, 16, arch.num_key_value_heads, arch.head_dim)
    if caches is None:
        caches = [
            torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(arch.num_hidden_layers)
        ]
    gen = torch.Generator().manual_seed(5)
    outs = []
    for steps in ([(0, 20, 20), (1, 9, 9)], [(0, 13, 33), (1, 1, 10)], [(0, 1, 34), (1, 1, 11)]):
        n = sum(s[1] for s in steps)
        ids = torch.randint(0, arch.vocab_size, (n,), generator=gen).to(DEVICE)
        meta = layout.metadata(steps)
        meta.slot_mapping = meta.slot_mapping.to(DEVICE)
        meta.query_start_loc = meta.query_start_loc.to(DEVICE)
        meta.seq_lens = meta.seq_lens.to(DEVICE)
        meta.block_tables = meta.block_tables.to(DEVICE)
        with torch.inference_mode():
            hidden = model(ids, positions_for(steps).to(DEVICE), caches, meta)
            outs.append(model.compute_logits(hidden).float().cpu())
    return torch.cat(outs)


#: a 2-layer Qwen3 (per-head q/k RMSNorm, tied embeddings) with a 32-wide head
_QWEN3_TINY = Preset(
    "test only", "Qwen3ForCausalLM", 128, 352, 2, 4, 2, head_dim=32, tie_word_embeddings=True
)


@pytest.fixture(scope="module", params=["tiny", "qwen3-tiny"])
def model_dir(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    if request.param in PRESETS:
        return create_model(out, request.param, seed=1)
    PRESETS[request.param] = _QWEN3_TINY
    try:
        return create_model(out, request.param, seed=1)
    finally:
        del PRESETS[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_modules(model_dir, dtype):
    loaded = load_model(model_dir, dtype=dtype, device=DEVICE, progress=False)
    model, arch = loaded.model.eval(), loaded.arch
    plain = _logits(model, arch, dtype, fused=False)
    model.fuse_projections()
    fused_proj = _logits(model, arch, dtype, fused=False)
    fused = _logits(model, arch, dtype, fused=True)
    rel = ((fused - plain).norm() / plain.norm()).item()
    if dtype == torch.float32:
        torch.testing.assert_close(fused_proj, plain, atol=1e-5, rtol=1e-5)
        assert rel < 1e-5
    else:
        # one bf16 ulp now and then (norm reduction order) may flip later roundings
        assert rel < 2e-2
    assert (fused.argmax(-1) == plain.argmax(-1)).float().mean().item() > 0.9
    assert torch.isfinite(fused).all()


def test_kv_write_in_rotary_kernel_equals_separate_write(model_dir):
    """The Triton backend as the runner sets it up (K/V stored by the q/k norm + rotary
    kernel, then ``triton_attend``) gives the logits and cache bytes of the same
    kernels with the separate write kernel (``triton_paged_attention``), bit for bit,
    over prefill chunks, a cached prefix, mixed and decode steps. The Llama model runs
    a bf16 cache, the Qwen3 one (q/k norm) an fp8 cache with scales; the kernel tests
    cover every other combination (interpreted, each run here takes ~10 s)."""
    dtype = torch.bfloat16
    loaded = load_model(model_dir, dtype=dtype, device=DEVICE, progress=False)
    model, arch = loaded.model.eval(), loaded.arch
    kv_dtype, scales = (torch.float8_e4m3fn, (0.5, 0.02)) if arch.qk_norm else (dtype, (1.0, 1.0))
    model.fuse_projections()
    layers = arch.num_hidden_layers
    model.set_kv_scales([scales[0]] * layers, [scales[1]] * layers)
    shape = (2, 24, 16, arch.num_key_value_heads, arch.head_dim)

    def run(attend) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.set_attention_backend(triton_paged_attention, attend)
        caches = [torch.zeros(shape, dtype=kv_dtype, device=DEVICE) for _ in range(layers)]
        return _logits(model, arch, dtype, True, caches), caches

    separate, separate_caches = run(None)
    fused, fused_caches = run(triton_attend)
    assert torch.equal(fused, separate)
    for got, want in zip(fused_caches, separate_caches, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert any(c.view(torch.uint8).any() for c in fused_caches)  # something was written
    assert torch.isfinite(fused).all()
