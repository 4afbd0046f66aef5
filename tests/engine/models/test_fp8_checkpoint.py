"""Checkpoints that store their projections in fp8 (llm-compressor / AutoFP8 layouts)
load into ``Fp8Linear`` through the real loader and serve the tokens of the same
weights quantized at load time; every other quantization, and every malformed fp8
checkpoint, is refused with a message naming the problem."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmfleet.engine.layers.quant import FP8_DTYPE, Fp8Linear
from lmfleet.engine.llm import LLM
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.models.presets import create_model
from lmfleet.engine.models.synthetic import write_fp8_checkpoint
from lmfleet.engine.request import SamplingParams
from lmfleet.errors import ConfigError, ModelLoadError

PROMPTS = [[5, 6, 7, 8, 9], [30, 31, 32], [100, 7, 250, 3, 3, 41, 9]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory) -> Path:
    return create_model(tmp_path_factory.mktemp("bf16"), "tiny", seed=1)


@pytest.fixture(scope="module")
def fp8_dir(src_dir, tmp_path_factory) -> Path:
    return write_fp8_checkpoint(src_dir, tmp_path_factory.mktemp("fp8"))


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_fp8_checkpoint_serves_the_tokens_of_load_time_quantization(src_dir, fp8_dir):
    """Per-channel fp8 weights from the checkpoint are the bytes and scales that
    ``--quantization fp8`` computes from the full-precision weights: same fused
    layers, same greedy tokens; and the checkpoint reads half the projection bytes."""
    stored = LLM(str(fp8_dir), progress=False)
    online = LLM(str(src_dir), progress=False, quantization="fp8")
    plain = LLM(str(src_dir), progress=False)
    assert stored.core.runner.quantization == online.core.runner.quantization == "fp8"
    for got, want in zip(
        stored.core.runner.model.model.layers, online.core.runner.model.model.layers, strict=True
    ):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            a, b = got.get_submodule(name), want.get_submodule(name)
            assert isinstance(a, Fp8Linear) and isinstance(b, Fp8Linear), name
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)), name
            assert torch.equal(a.scale, b.scale), name
    tokens = _tokens(stored)
    assert tokens == _tokens(online)
    assert tokens != _tokens(plain)  # the quantization is visible: the test can fail

    loaded = load_model(fp8_dir, dtype=torch.float32, device="cpu", progress=False)
    full = load_model(src_dir, dtype=torch.float32, device="cpu", progress=False)
    assert loaded.quantization == "fp8" and loaded.num_quantized == 7 * 2  # 7 per layer
    assert full.quantization is None and full.num_quantized == 0
    proj_params = sum(
        m.weight.numel() for m in full.model.model.layers.modules() if type(m) is nn.Linear
    )
    # float32 projections (4 bytes) became fp8 (1 byte) plus a 4-byte scale per row
    assert full.num_bytes - loaded.num_bytes > 0.7 * 3 * proj_params


@pytest.mark.parametrize(
    ("method", "static"),
    [("fp8", False), ("fp8", True), ("compressed-tensors", True)],
    ids=["autofp8-dynamic", "autofp8-static", "compressed-tensors-static"],
)
def test_per_tensor_checkpoints(src_dir, tmp_path, caplog, method, static):
    """One scale per weight (AutoFP8, llm-compressor's static FP8 scheme): every row
    of a projection gets that scale; static activation scales are dropped and logged;
    the weights come back within e4m3's precision."""
    out = write_fp8_checkpoint(
        src_dir, tmp_path / "fp8", method=method, strategy="tensor", static_input_scales=static
    )
    with caplog.at_level(logging.INFO, logger="lmfleet.engine.models.loader"):
        loaded = load_model(out, dtype=torch.float32, device="cpu", progress=False)
    q = loaded.model.get_submodule(Q_PROJ)
    assert isinstance(q, Fp8Linear) and q.weight.dtype == FP8_DTYPE
    assert q.scale.shape == (q.out_features,) and torch.unique(q.scale).numel() == 1
    want = load_file(str(src_dir / "model.safetensors"))[f"{Q_PROJ}.weight"]
    dequant = q.weight.float() * q.scale[:, None]
    assert ((dequant - want).norm() / want.norm()).item() < 0.04
    assert ("static input scales dropped" in caplog.text) == static
    llm = LLM(str(out), progress=False)
    assert all(len(t) == GREEDY.max_tokens for t in _tokens(llm))


@pytest.mark.parametrize(
    ("method", "block", "shard_bytes"),
    [("fp8", (128, 128), None), ("fp8", (48, 80), 40_000), ("compressed-tensors", (64, 64), None)],
    ids=["qwen-fp8-128", "partial-tiles-sharded", "compressed-tensors-block"],
)
def test_block_wise_checkpoints_load_dequantized(src_dir, tmp_path, method, block, shard_bytes):
    """Block-wise fp8 (Qwen's and DeepSeek's FP8 releases: weight_scale_inv per
    128x128 tile) has no fp8 GEMM here: each weight is its tiles' fp8 values times
    their scales, in the model dtype, in an ordinary Linear, also when the tile
    size does not divide the shape and when a weight and its scales sit in
    different shards; the model serves, and ``--quantization fp8`` requantizes it."""
    out = write_fp8_checkpoint(
        src_dir,
        tmp_path / "block",
        method=method,
        strategy="block",
        block=block,
        shard_bytes=shard_bytes,
    )
    if shard_bytes is not None:
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        scale = "weight_scale_inv" if method == "fp8" else "weight_scale"
        assert any(index[f"{n}.weight"] != index[f"{n}.{scale}"] for n in _projections(index))
    loaded = load_model(out, dtype=torch.float32, device="cpu", progress=False)
    assert loaded.quantization is None and loaded.num_quantized == 0  # nothing stays fp8
    q = loaded.model.get_submodule(Q_PROJ)
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    stored = {}
    for path in out.glob("*.safetensors"):
        stored.update(load_file(str(path)))
    w8 = stored[f"{Q_PROJ}.weight"].float()  # (128, 128)
    s = stored[f"{Q_PROJ}.weight_scale_inv" if method == "fp8" else f"{Q_PROJ}.weight_scale"]
    bn, bk = block
    assert s.shape == (-(-128 // bn), -(-128 // bk))
    for r, c in ((0, 0), (127, 127), (bn - 1, min(bk, 127)), (127, 0)):  # tile corners
        assert q.weight[r, c].item() == (w8[r, c] * s[r // bn, c // bk].float()).item()
    want = load_file(str(src_dir / "model.safetensors"))[f"{Q_PROJ}.weight"]
    assert ((q.weight - want).norm() / want.norm()).item() < 0.04
    assert all(len(t) == GREEDY.max_tokens for t in _tokens(LLM(str(out), progress=False)))
    requantized = LLM(str(out), progress=False, quantization="fp8")
    assert isinstance(requantized.core.runner.model.model.layers[0].self_attn.qkv_proj, Fp8Linear)
    # dequantized weights are full precision: int8 is allowed too
    int8 = LLM(str(out), progress=False, quantization="int8")
    assert int8.core.runner.quantization == "int8"


def _projections(weight_map: dict[str, str]) -> list[str]:
    return [n.removesuffix(".weight") for n in weight_map if n.endswith("_proj.weight")]


def test_llm_compressor_variants_load(src_dir, tmp_path):
    """What real exports vary in: scales stored in bf16 (llm-compressor keeps the model
    dtype) and the older ``naive-quantized`` format name load as fp8 weights whose
    scales are the stored bf16 values."""
    out = write_fp8_checkpoint(src_dir, tmp_path / "bf16-scales", scale_dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format"] = "naive-quantized"
    (out / "config.json").write_text(json.dumps(cfg))
    stored = load_file(str(out / "model.safetensors"))[f"{Q_PROJ}.weight_scale"]
    assert stored.dtype == torch.bfloat16 and stored.shape == (128, 1)
    loaded = load_model(out, dtype=torch.float32, device="cpu", progress=False)
    q = loaded.model.get_submodule(Q_PROJ)
    assert isinstance(q, Fp8Linear) and torch.equal(q.scale, stored.float().flatten())
    assert loaded.num_quantized == 14


def test_kv_cache_scheme_alone_quantizes_no_weights(src_dir, tmp_path):
    """A compressed-tensors config with only a ``kv_cache_scheme`` (no config groups):
    the weights load as they are and the per-layer K/V scales as the fp8 cache's."""
    out = _copy(src_dir, tmp_path / "kv-only")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "config_groups": {},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"},
    }
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.5 + layer)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, str(out / "model.safetensors"))
    loaded = load_model(out, dtype=torch.float32, device="cpu", progress=False)
    assert loaded.quantization is None and loaded.num_quantized == 0
    assert loaded.kv_scales is not None
    assert loaded.kv_scales.k == (0.5, 1.5) and loaded.kv_scales.v == (0.25, 0.25)


def test_a_projection_left_unquantized_stays_unfused(src_dir, fp8_dir, tmp_path):
    """A checkpoint whose ignore list kept one projection in full precision: that
    layer's q/k/v stay three layers (an fp8 and a float weight cannot share a GEMM),
    and the model runs as its parts say."""
    out = _copy(fp8_dir, tmp_path / "mixed")
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj"
    tensors[f"{name}.weight"] = load_file(str(src_dir / "model.safetensors"))[f"{name}.weight"]
    del tensors[f"{name}.weight_scale"]
    save_file(tensors, str(out / "model.safetensors"))
    llm = LLM(str(out), progress=False)
    attn0, attn1 = (layer.self_attn for layer in llm.core.runner.model.model.layers)
    assert attn0.qkv_proj is None and type(attn0.k_proj) is nn.Linear
    assert isinstance(attn0.q_proj, Fp8Linear) and isinstance(attn1.qkv_proj, Fp8Linear)
    assert all(len(t) == GREEDY.max_tokens for t in _tokens(llm))


def test_requantizing_an_fp8_checkpoint_is_refused(fp8_dir):
    with pytest.raises(ConfigError, match="already holds fp8 weights; --quantization int8"):
        LLM(str(fp8_dir), progress=False, quantization="int8")
    # asking for what it already is, is fine
    assert LLM(str(fp8_dir), progress=False, quantization="fp8").core.runner.quantization == "fp8"


def _copy(src: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for path in src.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def _edit(fp8_dir: Path, out: Path, *, config=None, tensors=None) -> Path:
    """A copy of ``fp8_dir`` with ``config(dict)`` / ``tensors(dict)`` applied."""
    _copy(fp8_dir, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        data = load_file(str(out / "model.safetensors"))
        tensors(data)
        save_file(data, str(out / "model.safetensors"))
    return out


def _set_quant(value):
    return lambda cfg: cfg.__setitem__("quantization_config", value)


def _group_weights(**changes):
    def edit(cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(changes)

    return edit


BAD_CHECKPOINTS = {
    "block-wise fp8 without scales of that name": (
        {"config": _set_quant({"quant_method": "fp8", "weight_block_size": [128, 128]})},
        "declares fp8 weights .* but no tensor ends in .weight_scale_inv",
    ),
    "a bad block size": (
        {"config": _set_quant({"quant_method": "fp8", "weight_block_size": [128]})},
        r"weight_block_size must be two positive integers, got \[128\]",
    ),
    "gptq": (
        {"config": _set_quant({"quant_method": "gptq", "bits": 4})},
        "quant_method 'gptq' is unsupported",
    ),
    "int4 pack-quantized": (
        {
            "config": lambda cfg: cfg["quantization_config"].update(
                format="pack-quantized",
                config_groups={"group_0": {"weights": {"num_bits": 4, "type": "int"}}},
            )
        },
        "format 'pack-quantized' is unsupported",
    ),
    "group strategy": (
        {"config": _group_weights(strategy="group", group_size=128)},
        "weight strategy 'group' is unsupported",
    ),
    "an fp8 weight without its scale": (
        {"tensors": lambda t: t.pop(f"{Q_PROJ}.weight_scale")},
        f"tensor {Q_PROJ}.weight is torch.float8_e4m3fn but has no weight_scale",
    ),
    "a scale without its fp8 weight": (
        {"tensors": lambda t: t.__setitem__(f"{Q_PROJ}.weight", t[f"{Q_PROJ}.weight"].float())},
        f"tensor {Q_PROJ}.weight has dtype torch.float32; an fp8 projection's weight",
    ),
    "negative scales": (
        {"tensors": lambda t: t[f"{Q_PROJ}.weight_scale"].neg_()},
        f"tensor {Q_PROJ}.weight_scale holds scales that are not finite and > 0",
    ),
    "a scale per column": (
        {"tensors": lambda t: t.__setitem__(f"{Q_PROJ}.weight_scale", torch.ones(3, 128))},
        r"weight_scale must hold one float scale or one per output row \(128\)",
    ),
    "lm_head in fp8": (
        {"tensors": lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(1))},
        "tensor lm_head.weight_scale: only the decoder layers' projections can hold fp8",
    ),
    "declared but not stored": (
        {"tensors": lambda t: [t.pop(n) for n in list(t) if n.endswith("weight_scale")]},
        "declares fp8 weights .* but no tensor ends in .weight_scale",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_fp8_checkpoints_are_refused(fp8_dir, tmp_path, case):
    edits, message = BAD_CHECKPOINTS[case]
    out = _edit(fp8_dir, tmp_path / "bad", **edits)
    with pytest.raises(ModelLoadError, match=message):
        load_model(out, dtype=torch.float32, device="cpu", progress=False)
