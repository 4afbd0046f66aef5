"""The architecture of a checkpoint, parsed from its Hugging Face ``config.json``.

This module reads only the keys the decoders need, normalises the two formats
transformers has used for rotary settings (``rope_theta`` + ``rope_scaling`` before
5.x, ``rope_parameters`` since), and rejects what the engine cannot run with a
:class:`~lmfleet.errors.ModelLoadError` that names the file. It knows nothing about
weights or devices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmfleet.engine.models.quant_config import CheckpointQuantization, parse_quantization_config
from lmfleet.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

#: rope types the rotary layer implements; "default" is stored as ``rope_scaling=None``
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """What a decoder needs to know about a checkpoint's shape and numerics.

    ``attention_bias`` is the q/k/v projection bias; ``attention_out_bias`` the o
    projection bias (Qwen2 has the first and never the second). ``rope_scaling`` is
    ``None`` for plain rotary embeddings, otherwise a dict with ``rope_type`` and the
    parameters of that type. ``sliding_window`` is ``None`` when the model attends
    over its whole context.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None
    #: the checkpoint's own fp8 weight quantization (``quantization_config``), if any
    quantization: CheckpointQuantization | None = None
    source: str = "config.json"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(
                    f"{self.source}: {name} must be a positive integer, got {value!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{self.source}: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelLoadError(f"{self.source}: rms_norm_eps and rope_theta must be positive")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        return (
            2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype.itemsize
        )

    def check_max_model_len(self, max_model_len: int) -> None:
        """Raise unless the decoders can serve contexts of ``max_model_len`` tokens.

        The decoders attend over the whole context, so a sliding window shorter than
        the served length would silently change the model's outputs.
        """
        if self.sliding_window is not None and self.sliding_window < max_model_len:
            raise ModelLoadError(
                f"{self.source}: sliding_window={self.sliding_window} is unsupported; "
                f"set max_model_len to at most {self.sliding_window} to serve this model"
            )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ArchConfig:
        """The config of a checkpoint directory, or of a GGUF checkpoint (a ``.gguf``
        file, a directory holding one, a built-in model name: see
        :mod:`lmfleet.engine.models.gguf_loader`)."""
        from lmfleet.engine.models.gguf_file import find_gguf

        gguf = find_gguf(model_dir)
        if gguf is not None:
            from lmfleet.engine.models.gguf_loader import arch_from_file

            return arch_from_file(gguf)
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: not found; is {model_dir} a model directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> ArchConfig:
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1:
            raise ModelLoadError(
                f"{source}: 'architectures' must list exactly one architecture, got {archs!r}"
            )
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch} in {source}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ModelLoadError(f"{source}: missing required key {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: hidden_act={act!r} is unsupported; only 'silu' is")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
        rope_theta, rope_scaling = _parse_rope(raw, source)

        bias = bool(raw.get("attention_bias", False))
        if arch == "Qwen2ForCausalLM":
            qkv_bias, out_bias = True, False
        elif arch == "MistralForCausalLM":
            qkv_bias, out_bias = False, False
        else:
            qkv_bias, out_bias = bias, bias

        sliding = raw.get("sliding_window")
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window"):
            sliding = None

        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            quantization=parse_quantization_config(raw.get("quantization_config"), source),
            source=source,
        )


def _parse_rope(raw: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config format."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # a per-layer-type mapping (used by models with mixed attention layers)
        raise ModelLoadError(f"{source}: per-layer rope_parameters are unsupported")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    else:
        theta = raw.get("rope_theta", 10000.0)
        legacy = raw.get("rope_scaling")
        scaling = dict(legacy) if isinstance(legacy, dict) else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if rope_type not in _ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: rope type {rope_type!r} is unsupported; supported: "
                f"{', '.join(_ROPE_TYPES)}"
            )
        if rope_type == "default":
            scaling = None
        else:
            missing = [key for key in _LLAMA3_KEYS if key not in scaling]
            if missing:
                raise ModelLoadError(f"{source}: llama3 rope scaling lacks {missing}")
            scaling = {"rope_type": rope_type, **{key: scaling[key] for key in _LLAMA3_KEYS}}
    return float(theta), scaling
