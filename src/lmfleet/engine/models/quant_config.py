"""Which pre-quantized checkpoints the loader reads: float8 e4m3 weights.

A checkpoint's ``config.json`` says how it was quantized in ``quantization_config``.
Two ways of writing fp8 weights are read, the ones llm-compressor's ``FP8`` and
``FP8_DYNAMIC`` schemes and AutoFP8 produce (vLLM serves both):

- ``quant_method: "compressed-tensors"`` with ``format: "float-quantized"`` (at the top
  or per config group; early exports say ``naive-quantized``): every group's weights
  8-bit ``float``, symmetric, strategy ``channel`` (``weight_scale`` of shape (out, 1))
  or ``tensor`` (one scale). One with no ``config_groups`` quantizes only the KV cache
  (``kv_cache_scheme``): its weights load as they are, its scales as KV scales.
- ``quant_method: "fp8"`` without ``weight_block_size``: one ``weight_scale`` per
  tensor.

A quantized projection is stored as ``<module>.weight`` (float8 e4m3, (out, in)) and
``<module>.weight_scale``; the real weight is ``weight * weight_scale`` per output
row. These map one to one onto :class:`~lmfleet.engine.layers.quant.Fp8Linear`.
Which modules are quantized is read from the tensors themselves (a ``weight_scale``
next to the weight), so ``ignore`` lists need no interpreting.

Block-wise fp8 (``quant_method: "fp8"`` with ``weight_block_size`` [bn, bk], as Qwen's
and DeepSeek's FP8 releases are stored, with ``<module>.weight_scale_inv``; or
compressed-tensors strategy ``block`` with ``weight_scale``: one scale per bn x bk
tile) has no fp8 GEMM here: its weights are dequantized at load (fp8 value times
its tile's scale in fp32, rounded once to the model's dtype), so the model serves
with the memory of its full-precision self; ``--quantization fp8`` then requantizes
them per channel (a second rounding).

Activations are always quantized per token at run time (what ``FP8_DYNAMIC``
checkpoints ask for). Static per-tensor ``input_scale`` tensors (the ``FP8`` scheme,
AutoFP8's ``activation_scheme: static``) are read and dropped: per-token scales
follow each row's range, so they lose no accuracy against the static ones.

Anything else (int4/int8 GPTQ or AWQ, NVFP4, bitsandbytes, ...)
raises :class:`~lmfleet.errors.ModelLoadError` saying what was found; unquantized
checkpoints can still be quantized at load time (``--quantization int8|fp8``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmfleet.errors import ModelLoadError

#: the checkpoint tensor, next to ``<module>.weight``, that marks a quantized module
WEIGHT_SCALE = "weight_scale"
#: a static activation scale, read and dropped
INPUT_SCALE = "input_scale"

#: the block-wise scale tensor's name in ``quant_method: "fp8"`` checkpoints
WEIGHT_SCALE_INV = "weight_scale_inv"

_UNSUPPORTED_HINT = (
    "lmfleet reads fp8 checkpoints (compressed-tensors 'float-quantized' with channel, "
    "tensor or block weight scales, or quant_method 'fp8'); load the unquantized model "
    "and pass --quantization fp8 or int8 instead"
)


@dataclass(frozen=True, slots=True)
class CheckpointQuantization:
    """An fp8 checkpoint the loader can read (see the module docstring)."""

    #: ``quantization_config.quant_method``: "compressed-tensors" or "fp8"
    method: str
    #: "channel" (a scale per output row), "tensor" (one scale per weight) or "block"
    #: (one per ``block`` tile: dequantized at load)
    strategy: str
    #: whether the checkpoint carries static activation scales (dropped on load)
    static_activations: bool
    #: (rows, columns) of a scale's tile, for "block"
    block: tuple[int, int] | None = None

    @property
    def scale_name(self) -> str:
        """The suffix of the scale tensor next to ``<module>.weight``."""
        if self.strategy == "block" and self.method == "fp8":
            return WEIGHT_SCALE_INV
        return WEIGHT_SCALE


def parse_quantization_config(raw: Any, source: str) -> CheckpointQuantization | None:
    """``config.json``'s ``quantization_config`` (None: an unquantized checkpoint),
    or :class:`ModelLoadError` for a kind of quantization this loader cannot read."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{source}: quantization_config must be an object, got {raw!r}")
    method = raw.get("quant_method")
    if method == "fp8":
        return _parse_fp8(raw, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw, source)
    raise ModelLoadError(
        f"{source}: quantization_config.quant_method {method!r} is unsupported; "
        + _UNSUPPORTED_HINT
    )


def _block(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelLoadError(f"{where} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_fp8(raw: Mapping[str, Any], source: str) -> CheckpointQuantization:
    block = None
    if raw.get("weight_block_size") is not None:
        block = _block(raw["weight_block_size"], f"{source}: weight_block_size")
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ModelLoadError(
            f"{source}: quantization_config.activation_scheme must be 'dynamic' or 'static', "
            f"got {scheme!r}"
        )
    return CheckpointQuantization(
        "fp8", "tensor" if block is None else "block", scheme == "static", block
    )


def _parse_compressed_tensors(raw: Mapping[str, Any], source: str) -> CheckpointQuantization | None:
    groups = raw.get("config_groups")
    if not groups:
        # fp8 KV-cache scales alone (kv_cache_scheme): the weights are not quantized,
        # and the scale tensors load through lmfleet.engine.kv_scales
        return None
    if not isinstance(groups, Mapping):
        raise ModelLoadError(f"{source}: quantization_config.config_groups must be an object")
    strategies: set[str] = set()
    blocks: set[tuple[int, int]] = set()
    static = False
    for name, group in groups.items():
        where = f"{source}: quantization_config.config_groups.{name}"
        if not isinstance(group, Mapping):
            raise ModelLoadError(f"{where} must be an object")
        fmt = group.get("format") or raw.get("format")
        # naive-quantized: what early Neural Magic fp8 exports declared for the same layout
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ModelLoadError(f"{where}: format {fmt!r} is unsupported; " + _UNSUPPORTED_HINT)
        weights = group.get("weights")
        if not isinstance(weights, Mapping):
            raise ModelLoadError(f"{where}: no weights scheme; " + _UNSUPPORTED_HINT)
        kind = (weights.get("num_bits"), weights.get("type"), weights.get("symmetric", True))
        if kind != (8, "float", True):
            raise ModelLoadError(
                f"{where}: weights of {weights.get('num_bits')} bits, type "
                f"{weights.get('type')!r}, symmetric {weights.get('symmetric')} are "
                "unsupported; " + _UNSUPPORTED_HINT
            )
        strategy = weights.get("strategy")
        if strategy not in ("channel", "tensor", "block"):
            raise ModelLoadError(
                f"{where}: weight strategy {strategy!r} is unsupported; " + _UNSUPPORTED_HINT
            )
        if strategy == "block":
            blocks.add(_block(weights.get("block_structure"), f"{where}.weights.block_structure"))
        strategies.add(strategy)
        acts = group.get("input_activations")
        if isinstance(acts, Mapping):
            if (acts.get("num_bits"), acts.get("type")) != (8, "float"):
                raise ModelLoadError(
                    f"{where}: input activations of {acts.get('num_bits')} bits, type "
                    f"{acts.get('type')!r} are unsupported; " + _UNSUPPORTED_HINT
                )
            static = static or not acts.get("dynamic", True)
    if "block" in strategies:
        if len(strategies) > 1 or len(blocks) > 1:
            raise ModelLoadError(
                f"{source}: block-wise fp8 groups mixed with other strategies or block "
                f"sizes ({sorted(strategies)}, {sorted(blocks)}) are unsupported"
            )
        return CheckpointQuantization("compressed-tensors", "block", static, blocks.pop())
    strategy = "channel" if "channel" in strategies else "tensor"
    return CheckpointQuantization("compressed-tensors", strategy, static_activations=static)


__all__ = [
    "INPUT_SCALE",
    "WEIGHT_SCALE",
    "WEIGHT_SCALE_INV",
    "CheckpointQuantization",
    "parse_quantization_config",
]
