"""Write random checkpoints in the Hugging Face layout, for tests and benchmarks.

The files look like a real export (``config.json`` and ``model.safetensors``, or
shards plus ``model.safetensors.index.json``), so they go through the real loader.
Weights are normal with std 0.02 from a fixed seed, norm weights are 1. Uses torch
and safetensors only; no tokenizer is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmfleet.engine.models.config import ArchConfig
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
