"""Per-layer fp8 KV scales: read from a checkpoint, calibrated at startup, or unit.

The end-to-end tests use the tiny model with its attention rescaled so that, in
full precision, it computes the same function, but its keys reach about +-1400 (far
beyond fp8's 448) and its values about 1e-3 (fp8 subnormals): ``q_proj`` is divided
and ``k_proj`` multiplied by ``K_MULT``, ``v_proj`` multiplied by ``V_MULT`` and
``o_proj`` divided by it. Real checkpoints have such layers (vLLM measured Qwen2-7B's
perplexity at 34.8 with unit scales, 22.6 with data-derived ones); random weights
do not, which is why the model is rescaled by hand here.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmfleet.engine.kv_scales import (
    CALIBRATION_RANDOM_TOKENS,
    CALIBRATION_TEXT,
    K_TARGET,
    V_TARGET,
    AmaxObserver,
    KVScales,
    checkpoint_kv_scales,
    kv_scale_tensor_layer,
    measure_kv_amax,
    scales_from_amax,
)
from lmfleet.engine.layers.attention import FP8_KV_DTYPE, to_fp8
from lmfleet.engine.llm import LLM
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.request import SamplingParams
from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.errors import ConfigError, ModelLoadError
from tests.engine.test_kv_fp8 import _teacher_forced_logits

K_MULT = 1500.0
V_MULT = 1e-3
BUDGET = 1 << 20
PROMPT = [(3 + 7 * j) % 500 + 10 for j in range(20)]


# ---------------------------------------------------------------- pure functions


def test_scale_tensor_names() -> None:
    assert kv_scale_tensor_layer("model.layers.3.self_attn.k_scale") == (3, "k")
    assert kv_scale_tensor_layer("model.layers.0.self_attn.v_scale") == (0, "v")
    assert kv_scale_tensor_layer("model.layers.12.self_attn.kv_scale") == (12, "kv")
    assert kv_scale_tensor_layer("model.layers.1.self_attn.k_proj.k_scale") == (1, "k")
    assert kv_scale_tensor_layer("model.layers.1.self_attn.v_proj.v_scale") == (1, "v")
    assert kv_scale_tensor_layer("model.layers.4.self_attn.k_proj.output_scale") == (4, "k")
    assert kv_scale_tensor_layer("model.layers.4.self_attn.v_proj.output_scale") == (4, "v")
    for other in (
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.q_scale",
        "model.layers.1.self_attn.k_proj.v_scale",
        "model.layers.1.self_attn.q_proj.output_scale",
        "model.layers.1.self_attn.o_proj.output_scale",
        "lm_head.k_scale",
    ):
        assert kv_scale_tensor_layer(other) is None, other


def test_scales_from_amax_targets_and_fallback() -> None:
    scales = scales_from_amax([400.0, 0.0, math.nan], [1.0, 2e-3, math.inf], 17)
    assert scales.k == (400.0 / K_TARGET, 1.0, 1.0)
    assert scales.v == (1.0 / V_TARGET, 2e-3 / V_TARGET, 1.0)
    assert scales.source == "calibrated" and scales.calibration_tokens == 17
    assert scales.layer(0) == (2.0, 0.01)
    text = scales.describe()
    assert text.startswith("calibrated on 17 tokens: k_scale 1..2, v_scale 2e-05..1 over 3 layers")


def test_checkpoint_scales_need_every_layer() -> None:
    got = checkpoint_kv_scales({(0, "k"): 2.0, (0, "v"): 3.0, (1, "kv"): 0.5}, 2)
    assert (got.k, got.v, got.source) == ((2.0, 0.5), (3.0, 0.5), "checkpoint")
    # a per-tensor scale beats the shared one
    got = checkpoint_kv_scales({(0, "kv"): 0.5, (0, "v"): 4.0}, 1)
    assert (got.k, got.v) == ((0.5,), (4.0,))
    with pytest.raises(ValueError, match=r"none for layer 1's V \(model.layers.1.self_attn.v_s"):
        checkpoint_kv_scales({(0, "kv"): 1.0, (1, "k"): 1.0}, 2)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_scale must be finite and > 0"):
        checkpoint_kv_scales({(0, "k"): -1.0, (0, "v"): 1.0}, 1)
    with pytest.raises(ValueError, match="KV scales for layer 2, but the model has 2"):
        checkpoint_kv_scales({(0, "kv"): 1.0, (1, "kv"): 1.0, (2, "k"): 1.0}, 2)
    with pytest.raises(ValueError, match="finite and > 0"):
        KVScales((1.0, 0.0), (1.0, 1.0), "checkpoint")
    with pytest.raises(ValueError, match="2 K scales but 1 V scales"):
        KVScales((1.0, 1.0), (1.0,), "checkpoint")


def test_amax_observer_passes_through_and_keeps_the_maximum() -> None:
    calls = []

    def attn(q, k, v, cache, meta, scale, k_scale=1.0, v_scale=1.0):
        calls.append((scale, k_scale, v_scale))
        return q * 2

    obs = AmaxObserver(attn)
    assert obs.result() == (0.0, 0.0)
    q = torch.ones(2, 1, 2)
    out = obs(q, torch.tensor([[[-3.0, 1.0]]]), torch.tensor([[[0.5, -0.25]]]), None, None, 0.1)
    assert torch.equal(out, q * 2)
    obs(q, torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[0.75, 0.0]]]), None, None, 0.1, 1.0, 1.0)
    assert obs.result() == (3.0, 0.75)
    assert calls == [(0.1, 1.0, 1.0), (0.1, 1.0, 1.0)]


def test_measure_kv_amax_restores_the_layers_even_on_error() -> None:
    class Attn:
        def __init__(self) -> None:
            self.attn_fn = lambda q, k, v, cache, meta, scale, ks=1.0, vs=1.0: (q, ks, vs)
            # a fused K/V write would bypass attn_fn: switched off while observing
            self.attend_fn = lambda q, cache, meta, scale, ks=1.0, vs=1.0: q
            self.k_scale, self.v_scale = 3.0, 5.0

    def state(a: Attn) -> tuple:
        return a.attn_fn, a.attend_fn, a.k_scale, a.v_scale

    attns = [Attn(), Attn()]
    before = [state(a) for a in attns]
    seen = []

    def run() -> None:
        for i, a in enumerate(attns):
            assert a.attend_fn is None
            k = torch.full((1, 1, 2), -2.0 * (i + 1))
            seen.append(a.attn_fn(None, k, k / 4, None, None, 0.1, a.k_scale, a.v_scale))

    assert measure_kv_amax(attns, run) == ([2.0, 4.0], [0.5, 1.0])
    assert [s[1:] for s in seen] == [(1.0, 1.0), (1.0, 1.0)]  # scales were 1.0 inside
    assert [state(a) for a in attns] == before

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_kv_amax(attns, boom)
    assert [state(a) for a in attns] == before


# ---------------------------------------------------------------- checkpoints


def _with_tensors(
    src: Path, dst: Path, extra: dict[str, torch.Tensor], mults: dict[str, float] | None = None
) -> Path:
    """A copy of the checkpoint ``src`` at ``dst`` with each weight whose name holds
    a key of ``mults`` multiplied by its value, and the ``extra`` tensors added."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in list(weights):
        for part, mult in (mults or {}).items():
            if part in name:
                weights[name] = weights[name] * mult
    weights.update(extra)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def outlier_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with large keys and tiny values (module docstring)."""
    mults = {
        ".q_proj.": 1 / K_MULT,
        ".k_proj.": K_MULT,
        ".v_proj.": V_MULT,
        ".o_proj.": 1 / V_MULT,
    }
    return _with_tensors(tiny_model_dir, tmp_path_factory.mktemp("outlier") / "m", {}, mults)


def test_loader_reads_checkpoint_scales(tiny_model_dir, tmp_path) -> None:
    extra = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.25),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.125]),
        "model.layers.1.self_attn.kv_scale": torch.tensor(2.0, dtype=torch.bfloat16),
    }
    model_dir = _with_tensors(tiny_model_dir, tmp_path / "m", extra)
    loaded = load_model(model_dir, dtype=torch.float32, device="cpu", progress=False)
    assert loaded.kv_scales == KVScales((0.25, 2.0), (0.125, 2.0), "checkpoint")
    plain = load_model(tiny_model_dir, dtype=torch.float32, device="cpu", progress=False)
    assert plain.kv_scales is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"model.layers.0.self_attn.k_scale": torch.ones(2)},
            r"tensor model.layers.0.self_attn.k_scale must hold one float \(a per-tensor KV "
            r"scale\), got shape \[2\] torch.float32",
        ),
        (
            {"model.layers.0.self_attn.kv_scale": torch.tensor(1.0)},
            r"model.safetensors: the checkpoint has KV scales but none for layer 1's K",
        ),
        (
            {
                "model.layers.0.self_attn.kv_scale": torch.tensor(1.0),
                "model.layers.1.self_attn.kv_scale": torch.tensor(0.0),
            },
            r"model.layers.1.self_attn.k_scale must be finite and > 0, got 0.0",
        ),
    ],
)
def test_bad_checkpoint_scales_fail_the_load(tiny_model_dir, tmp_path, extra, message) -> None:
    model_dir = _with_tensors(tiny_model_dir, tmp_path / "m", extra)
    with pytest.raises(ModelLoadError, match=message):
        load_model(model_dir, dtype=torch.float32, device="cpu", progress=False)


def _llm(model_dir: Path, kv: str = "fp8", scales: str = "auto") -> LLM:
    return LLM(
        str(model_dir),
        progress=False,
        dtype="float32",
        kv_cache_dtype=kv,
        kv_cache_scales=scales,
        kv_cache_memory_bytes=BUDGET,
        attention_backend="torch",
    )


def _layer_scales(llm: LLM) -> list[tuple[float, float]]:
    return [(a.self_attn.k_scale, a.self_attn.v_scale) for a in llm.core.runner.model.model.layers]


def test_scale_sources(tiny_model_dir, tmp_path, caplog) -> None:
    """auto takes the checkpoint's scales and calibrates without them; calibrate
    ignores the checkpoint's; unit is 1.0; a full-precision cache never scales."""
    extra = {
        "model.layers.0.self_attn.kv_scale": torch.tensor(0.5),
        "model.layers.1.self_attn.k_scale": torch.tensor(0.25),
        "model.layers.1.self_attn.v_scale": torch.tensor(4.0),
    }
    with_scales = _with_tensors(tiny_model_dir, tmp_path / "m", extra)
    caplog.set_level(logging.INFO, logger="lmfleet.engine.runner")
    llm = _llm(with_scales)
    assert llm.core.runner.kv_scales.source == "checkpoint"
    assert _layer_scales(llm) == [(0.5, 0.5), (0.25, 4.0)]
    assert "fp8 KV cache scales, checkpoint: k_scale 0.25..0.5, v_scale 0.5..4" in caplog.text

    calibrated = _llm(with_scales, scales="calibrate").core.runner.kv_scales
    tokens = len(Tokenizer.from_dir(tiny_model_dir).encode(CALIBRATION_TEXT))
    assert (calibrated.source, calibrated.calibration_tokens) == ("calibrated", tokens)
    assert _layer_scales(_llm(tiny_model_dir)) == list(zip(calibrated.k, calibrated.v, strict=True))
    assert all(0 < s < 0.1 for s in calibrated.k + calibrated.v)  # |K|, |V| ~ 1 here

    assert _layer_scales(_llm(with_scales, scales="unit")) == [(1.0, 1.0)] * 2
    caplog.clear()
    full = _llm(with_scales, kv="auto")
    assert full.core.runner.kv_scales.source == "unit"
    assert _layer_scales(full) == [(1.0, 1.0)] * 2
    assert "the checkpoint's fp8 KV scales go unused: the KV cache is torch.float32" in caplog.text


def test_calibration_measures_each_layers_largest_values(outlier_model) -> None:
    """The calibrated scales are the largest |K| and |V| the calibration prefill
    writes, over the targets: recomputed here with a plain observer."""
    llm = _llm(outlier_model, scales="calibrate")
    runner = llm.core.runner
    scales = runner.kv_scales
    tokens = runner._calibration_tokens()
    again = runner.calibrate_kv_scales(tokens)
    assert again == scales  # deterministic, and the model's own scales were restored
    k_amax = [k * K_TARGET for k in scales.k]
    v_amax = [v * V_TARGET for v in scales.v]
    assert all(700 < a < 3000 for a in k_amax), k_amax  # beyond fp8's 448
    assert all(2e-4 < a < 3e-3 for a in v_amax), v_amax  # fp8 subnormals at scale 1
    assert _layer_scales(llm) == list(zip(scales.k, scales.v, strict=True))


def test_cache_holds_values_over_their_scale(outlier_model) -> None:
    """After a prefill, the bytes in the cache are ``to_fp8(k, k_scale)``: no key
    saturated, values not flushed to zero."""
    llm = _llm(outlier_model)
    runner = llm.core.runner
    captured = {}
    attn = runner.model.model.layers[0].self_attn
    inner = attn.attn_fn

    def spy(q, k, v, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0):
        captured.update(k=k.clone(), v=v.clone(), slots=meta.slot_mapping.clone(), cache=kv_cache)
        return inner(q, k, v, kv_cache, meta, scale, k_scale, v_scale)

    attn.attn_fn = spy
    try:
        llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    finally:
        attn.attn_fn = inner
    k_scale, v_scale = runner.kv_scales.layer(0)
    cache = captured["cache"]
    n_kv, head_dim = cache.shape[-2:]
    flat = cache.view(torch.uint8).view(2, -1, n_kv, head_dim)[:, captured["slots"]]
    assert torch.equal(flat[0], to_fp8(captured["k"], k_scale).view(torch.uint8))
    assert torch.equal(flat[1], to_fp8(captured["v"], v_scale).view(torch.uint8))
    stored_k = flat[0].view(FP8_KV_DTYPE).float()
    assert stored_k.abs().max() < 448 and captured["k"].abs().max() > 448
    assert (flat[1].view(FP8_KV_DTYPE).float() != 0).float().mean() > 0.99


def _logit_error(ref_llm: LLM, llm: LLM, tokens: list[int]) -> tuple[float, float]:
    ref = _teacher_forced_logits(ref_llm, tokens, len(PROMPT))
    got = _teacher_forced_logits(llm, tokens, len(PROMPT))
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


def test_calibrated_scales_rescue_a_model_unit_scales_break(outlier_model) -> None:
    """Teacher-forced logits against the same model over a full-precision cache:
    unit scales saturate the keys and flush the values, calibrated scales keep the
    error where it is for an ordinary model (0.018-0.024 in test_kv_fp8)."""
    full = _llm(outlier_model, kv="auto")
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = PROMPT + full.generate([PROMPT], greedy)[0].token_ids
    unit_rel, unit_agree = _logit_error(full, _llm(outlier_model, scales="unit"), tokens)
    cal_rel, cal_agree = _logit_error(full, _llm(outlier_model), tokens)
    print(
        f"unit scales: rel {unit_rel:.4f} agree {unit_agree:.3f}; calibrated: {cal_rel:.4f} {cal_agree:.3f}"
    )
    assert unit_rel > 0.3, unit_rel
    assert cal_rel < 0.05, cal_rel
    assert cal_agree >= 0.85, cal_agree


def test_calibration_without_a_tokenizer_uses_random_ids(tiny_model_dir, tmp_path, caplog) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "tokenizer.json").unlink()
    caplog.set_level(logging.WARNING, logger="lmfleet.engine.runner")
    scales = _llm(model_dir).core.runner.kv_scales
    assert (scales.source, scales.calibration_tokens) == ("calibrated", CALIBRATION_RANDOM_TOKENS)
    assert "has no tokenizer.json: calibrating the fp8 KV scales on random token ids" in caplog.text
    assert _llm(model_dir).core.runner.kv_scales == scales  # the same ids every time


def test_unknown_scale_source_is_a_config_error(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match="kv_cache_scales: must be one of 'auto', 'calibrate'"):
        LLM(str(tiny_model_dir), progress=False, kv_cache_scales="dynamic")


def test_triton_graph_layout_uses_the_scales(outlier_model) -> None:
    """The Triton kernels (interpreter) with calibrated scales give the torch
    backend's tokens, eagerly and through the CUDA graphs' padded layout. Kernels
    that ignored the scales would read keys 100x too small and values 1e5x too
    large. (Calibration is cut to 64 tokens by the step budget, to keep the
    interpreter quick.)"""
    pytest.importorskip("triton")
    prompts = [[(7 * i + 3 * j) % 400 + 20 for j in range(4 + 5 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

    def tokens(backend: str, graphs: bool = False, **kw) -> list[list[int]]:
        llm = LLM(
            str(outlier_model),
            progress=False,
            dtype="float32",
            kv_cache_dtype="fp8",
            kv_cache_memory_bytes=BUDGET,
            attention_backend=backend,
            max_num_batched_tokens=64,
            **kw,
        )
        scales = llm.core.runner.kv_scales
        assert (scales.source, scales.calibration_tokens) == ("calibrated", 64)
        if graphs:
            llm.core.runner.use_decode_graphs(capture=False)
        return [o.token_ids for o in llm.generate(prompts, params)]

    want = tokens("torch")
    assert tokens("triton", enforce_eager=True) == want
    assert tokens("triton", graphs=True) == want
