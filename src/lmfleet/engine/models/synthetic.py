"""Write random checkpoints in the Hugging Face layout, for tests and benchmarks.

The files look like a real export (``config.json`` and ``model.safetensors``, or
shards plus ``model.safetensors.index.json``), so they go through the real loader.
Weights are normal with std 0.02 from a fixed seed, norm weights are 1. Uses torch
and safetensors only; no tokenizer is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmfleet.engine.layers.quant import (
    FP8_DTYPE,
    FP8_MAX,
    expand_block_scales,
    quantize_fp8_weight,
)
from lmfleet.engine.models.config import ArchConfig
from lmfleet.engine.models.quant_config import INPUT_SCALE, CheckpointQuantization
from lmfleet.engine.models.registry import resolve

_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_random_checkpoint(
    out_dir: str | Path,
    arch: str = "LlamaForCausalLM",
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    rope_scaling: dict[str, Any] | None = None,
    shard_bytes: int | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random ``arch`` checkpoint into ``out_dir`` (created) and return it.

    ``rope_scaling`` takes the legacy form, e.g. ``{"rope_type": "llama3", "factor":
    8.0, ...}``. ``shard_bytes`` splits the weights into shards of at most about
    that many bytes. ``extra_config`` keys override the written ``config.json``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rope_theta = 10000.0
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            **(rope_scaling or {}),
        },
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        **(extra_config or {}),
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    cfg = ArchConfig.from_dict(config, source=str(config_path))
    with torch.device("meta"):
        model = resolve(cfg)(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied once
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            t = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        tensors[name] = t.to(_DTYPES[dtype])
    _write_tensors(out, tensors, shard_bytes)
    return out


#: the projections an fp8 checkpoint stores in float8 (as llm-compressor's FP8 schemes do)
_FP8_PROJECTIONS = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


def write_fp8_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "compressed-tensors",
    strategy: str = "channel",
    static_input_scales: bool = False,
    block: tuple[int, int] = (128, 128),
    shard_bytes: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """Copy the checkpoint in ``src_dir`` to ``out_dir`` with every decoder-layer
    projection stored as float8 e4m3 weights and scales, the way llm-compressor
    (``method="compressed-tensors"``; ``strategy`` "channel": a scale per output row,
    FP8_DYNAMIC; "tensor": one per weight) or AutoFP8 (``method="fp8"``, per tensor)
    write them, with the matching ``quantization_config``; ``strategy="block"`` writes
    one scale per ``block`` tile (``weight_scale_inv`` under ``method="fp8"``, as
    Qwen's and DeepSeek's FP8 releases). ``static_input_scales`` adds the per-tensor
    ``input_scale`` tensors of static activation schemes. Per channel, the fp8 bytes
    and scales are those :class:`~lmfleet.engine.layers.quant.Fp8Linear` computes when
    it quantizes the same weights at load time. Other files (tokenizer, ...) are
    copied; the weights go to one ``model.safetensors``, or to shards of about
    ``shard_bytes``. ``scale_dtype`` is the scales' stored dtype (llm-compressor
    stores them in the model's, e.g. bfloat16; the fp8 values are computed from the
    rounded scales then, as it does)."""
    if method not in ("compressed-tensors", "fp8") or strategy not in (
        "channel",
        "tensor",
        "block",
    ):
        raise ValueError(f"unsupported fp8 layout: method {method!r}, strategy {strategy!r}")
    if method == "fp8" and strategy == "channel":
        raise ValueError("quant_method 'fp8' checkpoints have per-tensor or block scales")
    # the loader's own rule for the scale tensor's name (weight_scale or weight_scale_inv)
    layout = CheckpointQuantization(
        method, strategy, static_input_scales, block if strategy == "block" else None
    )
    scale_name = layout.scale_name
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not _FP8_PROJECTIONS.match(name):
            quantized[name] = tensor
            continue
        prefix = name.removesuffix(".weight")
        w = tensor.float()
        if strategy == "channel":
            scale = quantize_fp8_weight(w)[1][:, None]  # (out, 1), as compressed-tensors
        elif strategy == "block":
            scale = _block_scales(w, block)  # (ceil(out / bn), ceil(in / bk))
        else:
            scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)  # ()
        scale = scale.to(scale_dtype).float()  # quantize against the scale as stored
        full = expand_block_scales(scale, block, w.shape) if strategy == "block" else scale
        quantized[name] = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()
        quantized[f"{prefix}.{scale_name}"] = scale.to(scale_dtype).contiguous()
        if static_input_scales:
            quantized[f"{prefix}.{INPUT_SCALE}"] = torch.tensor(0.05)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if method == "fp8":
        quant: dict[str, Any] = {
            "quant_method": "fp8",
            "activation_scheme": "static" if static_input_scales else "dynamic",
        }
        if strategy == "block":
            quant["weight_block_size"] = list(block)
    else:
        acts = {"num_bits": 8, "type": "float", "symmetric": True}
        if static_input_scales:
            acts |= {"strategy": "tensor", "dynamic": False}
        else:
            acts |= {"strategy": "token", "dynamic": True}
        quant = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "symmetric": True,
                        "strategy": strategy,
                        "dynamic": False,
                        "block_structure": list(block) if strategy == "block" else None,
                    },
                    "input_activations": acts,
                }
            },
        }
    config["quantization_config"] = quant
    rewritten = ("config.json", "model.safetensors.index.json")
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in rewritten:
            shutil.copy2(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_tensors(out, quantized, shard_bytes)
    return out


def _block_scales(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """One float32 scale per ``block`` tile of ``weight`` (out, in): the tile's largest
    |w| maps to 448; (ceil(out / bn), ceil(in / bk))."""
    bn, bk = block
    out, inp = weight.shape
    rows, cols = -(-out // bn), -(-inp // bk)
    padded = torch.zeros(rows * bn, cols * bk)
    padded[:out, :inp] = weight.abs()
    amax = padded.view(rows, bn, cols, bk).amax(dim=(1, 3))  # (rows, cols)
    return (amax / FP8_MAX).clamp(min=1e-12)


def _write_tensors(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    if shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )
