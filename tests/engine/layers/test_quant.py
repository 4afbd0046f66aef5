"""Weight-only int8 / fp8 linears and the module swap, on CPU (fp8 dequantizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmfleet.engine.layers.quant import (
    Fp8Linear,
    Int8WeightOnlyLinear,
    quantize_fp8_rows,
    quantize_model,
)
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.models.presets import create_model
from tests.engine.layers.paged_kv import BlockLayout, positions_for


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _linear(bias: bool = True, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(128, 96, bias=bias)
    return lin, torch.randn(7, 128)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_close_to_float(bias: bool) -> None:
    lin, x = _linear(bias)
    q = Int8WeightOnlyLinear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (96,)
    assert _rel_err(q(x), lin(x)) < 1e-2


def test_int8_weights_round_trip() -> None:
    lin, _ = _linear()
    q = Int8WeightOnlyLinear.from_linear(lin)
    deq = q.weight.float() * q.scale[:, None]
    # symmetric rounding: every weight within half a step of its channel's grid
    assert ((deq - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    assert q.weight.abs().amax(dim=1).eq(127).all()  # each row's largest |w| hits the edge


def test_fp8_fallback_close_to_float() -> None:
    lin, x = _linear()
    q = Fp8Linear.from_linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn
    assert not q._scaled_mm_on(x)  # CPU: dequantize
    assert _rel_err(q(x), lin(x)) < 5e-2


def test_fp8_scaled_mm_path_matches_emulation() -> None:
    """The activation-quantized path, where this torch runs ``_scaled_mm`` on CPU."""
    lin, x = _linear()
    q = Fp8Linear.from_linear(lin)
    x_q, x_scale = quantize_fp8_rows(x)
    emulated = (x_q.float() * x_scale) @ (q.weight.float() * q.scale[:, None]).T + lin.bias
    try:
        got = q.forward_scaled_mm(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {exc}")
    assert _rel_err(got, emulated) < 1e-2  # bf16 output
    assert _rel_err(got, lin(x)) < 8e-2


def test_quantized_modules_keep_state_in_buffers() -> None:
    lin, _ = _linear()
    q = Int8WeightOnlyLinear.from_linear(lin)
    names = {n for n, _ in q.named_buffers()}
    assert names == {"weight", "scale", "bias"}
    assert list(q.parameters()) == []
    assert "in_features=128, out_features=96, bias=True" in repr(q)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="int8"):
        quantize_model(nn.Module(), "int4")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_model(tmp_path_factory.mktemp("tiny"), "tiny")


def _logits(model: nn.Module, block_size: int = 16) -> torch.Tensor:
    """A prefill of two prompts, then one decode step; logits of every token."""
    cfg = model.config
    layout = BlockLayout(16, block_size)
    caches = [
        torch.zeros(2, 16, block_size, cfg.num_key_value_heads, cfg.head_dim)
        for _ in range(cfg.num_hidden_layers)
    ]
    gen = torch.Generator().manual_seed(0)
    outs = []
    for steps in ([(0, 21, 21), (1, 9, 9)], [(0, 1, 22), (1, 1, 10)]):
        n = sum(q for _, q, _ in steps)
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
        hidden = model(ids, positions_for(steps), caches, layout.metadata(steps))
        outs.append(model.compute_logits(hidden))
    return torch.cat(outs)


@pytest.mark.parametrize(("method", "tol"), [("int8", 3e-2), ("fp8", 1e-1)])
def test_quantize_model_through_loader(tiny_dir: Path, method: str, tol: float) -> None:
    model = load_model(tiny_dir, dtype=torch.float32, device="cpu", progress=False).model
    with torch.inference_mode():
        ref = _logits(model)
        count = quantize_model(model, method)
        got = _logits(model)
    per_layer = 7  # q, k, v, o, gate, up, down
    assert count == per_layer * model.config.num_hidden_layers
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert got.shape == ref.shape and torch.isfinite(got).all()
    err = _rel_err(got, ref)
    print(f"{method}: logits relative error {err:.2e}")
    assert err < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_scaled_mm_on_cuda() -> None:
    lin, x = _linear()
    lin, x = lin.cuda().bfloat16(), x.cuda().bfloat16()
    q = Fp8Linear.from_linear(lin)
    if not q._scaled_mm_on(x):
        pytest.skip("this GPU has no fp8 matrix units")
    assert _rel_err(q(x), lin(x)) < 8e-2
    deq = Fp8Linear(q.weight, q.scale, q.bias, use_scaled_mm=False)
    assert _rel_err(q(x), deq(x)) < 5e-2
