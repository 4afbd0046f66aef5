"""Where the tensors of an fp8 checkpoint go (see :mod:`lmfleet.engine.models.quant_config`).

:func:`install_fp8_layers` runs on the model built on ``meta``, before any tensor is
read. It finds the quantized projections by their scale tensors and returns, for
each checkpoint tensor that belongs to one, an :class:`Fp8Tensor` saying where it
goes; the loader hands each tensor to it as it reads the file.

- Per-channel and per-tensor scales: the projection becomes an empty
  :class:`~lmfleet.engine.layers.quant.Fp8Linear` that the stored float8 weight,
  its scales (one per row, a single one repeated per row) and the bias fill as they
  are.
- Block-wise scales: the projection stays an ``nn.Linear``; once both its float8
  weight and its (ceil(out / bn), ceil(in / bk)) scales are read, in either order
  and from any shard, the weight is dequantized (in fp32) and stored in the
  model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lmfleet.engine.layers.quant import FP8_DTYPE, Fp8Linear, dequantize_fp8_blocks
from lmfleet.engine.models.quant_config import INPUT_SCALE, CheckpointQuantization
from lmfleet.errors import ModelLoadError


@dataclass(slots=True)
class _BlockPair:
    """A block-wise fp8 projection's weight and scales, held until both are read."""

    linear: nn.Linear
    block: tuple[int, int]
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def add(
        self, kind: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> None:
        if kind == "block_weight":
            self.weight = tensor.to(device)
        else:
            self.scale = tensor.to(device)
        if self.weight is not None and self.scale is not None:
            w = dequantize_fp8_blocks(self.weight, self.scale, self.block).to(dtype)
            self.linear.weight = nn.Parameter(w, requires_grad=False)
            self.weight = self.scale = None


@dataclass(frozen=True, slots=True)
class Fp8Tensor:
    """Where one checkpoint tensor of an fp8 projection goes. ``kind``:

    - "weight" (float8 (out, in)), "weight_scale" (one scale, or one per output row),
      "bias": an :class:`Fp8Linear`'s buffers;
    - "block_weight", "block_scale": a block-wise pair, dequantized into the
      ``nn.Linear`` once both are read;
    - "input_scale": a static activation scale, checked and dropped.
    """

    module: nn.Module
    kind: str
    pair: _BlockPair | None = None

    @property
    def required(self) -> bool:
        return self.kind != "input_scale"

    def assign(
        self, path: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Check ``tensor`` (read from ``path`` as ``name``) and put it in place."""
        mod = self.module
        out, inp = mod.weight.shape  # (out, in) on every kind of projection
        if self.kind in ("weight", "block_weight"):
            if tensor.dtype != FP8_DTYPE:
                raise ModelLoadError(
                    f"{path}: tensor {name} has dtype {tensor.dtype}; an fp8 projection's "
                    f"weight must be {FP8_DTYPE} (it has scales)"
                )
            check_shape(path, name, tuple(tensor.shape), (out, inp))
        if self.kind == "weight":
            mod.weight = tensor.to(device)
        elif self.kind == "weight_scale":
            if tensor.numel() not in (1, out) or tensor.dim() > 2 or not tensor.is_floating_point():
                raise ModelLoadError(
                    f"{path}: tensor {name} must hold one float scale or one per output row "
                    f"({out}), got shape {list(tensor.shape)} {tensor.dtype}"
                )
            scale = tensor.float().reshape(-1).expand(out)
            _check_scales(path, name, scale)
            mod.scale = scale.contiguous().to(device)
        elif self.kind == "bias":
            check_shape(path, name, tuple(tensor.shape), (out,))
            mod.bias = tensor.to(device=device, dtype=dtype)
        elif self.kind in ("block_weight", "block_scale"):
            assert self.pair is not None
            if self.kind == "block_scale":
                bn, bk = self.pair.block
                check_shape(path, name, tuple(tensor.shape), (-(-out // bn), -(-inp // bk)))
                if not tensor.is_floating_point():
                    raise ModelLoadError(f"{path}: tensor {name} has dtype {tensor.dtype}")
                _check_scales(path, name, tensor.float())
            self.pair.add(self.kind, tensor, dtype, device)
        elif tensor.numel() != 1:  # input_scale: per-tensor static, dropped
            raise ModelLoadError(
                f"{path}: tensor {name} must hold one float (a static activation scale), "
                f"got shape {list(tensor.shape)}"
            )


def check_shape(path: Path, name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    """Raise ``ModelLoadError`` when checkpoint tensor ``name`` of ``path`` has
    ``shape`` where the model expects ``want`` (for every tensor the loader reads)."""
    if shape != want:
        raise ModelLoadError(
            f"{path}: tensor {name} has shape {list(shape)}, the model expects {list(want)}"
        )


def _check_scales(path: Path, name: str, scale: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ModelLoadError(f"{path}: tensor {name} holds scales that are not finite and > 0")


def install_fp8_layers(
    model: nn.Module, quant: CheckpointQuantization, files: list[Path], listing: Path
) -> dict[str, Fp8Tensor]:
    """Prepare ``model`` (on ``meta``) for the fp8 projections of ``files``: those with
    a scale tensor next to their weight. Per channel or tensor they become empty
    :class:`Fp8Linear` layers (decoder layers only); block-wise ones stay
    ``nn.Linear``. Returns where each of their checkpoint tensors goes, by name."""
    slots: dict[str, Fp8Tensor] = {}
    suffix = "." + quant.scale_name
    for name in _tensor_names(files):
        if not name.endswith(suffix):
            continue
        prefix = name.removesuffix(suffix)
        owner, _, leaf = prefix.rpartition(".")
        try:
            parent = model.get_submodule(owner)
        except AttributeError:
            parent = None
        linear = getattr(parent, leaf, None)
        if quant.strategy == "block":
            if type(linear) is not nn.Linear:
                raise ModelLoadError(f"{listing}: tensor {name}: {prefix} is not a linear layer")
            assert quant.block is not None
            pair = _BlockPair(linear, quant.block)
            slots[f"{prefix}.weight"] = Fp8Tensor(linear, "block_weight", pair)
            slots[name] = Fp8Tensor(linear, "block_scale", pair)
            slots[f"{prefix}.{INPUT_SCALE}"] = Fp8Tensor(linear, "input_scale")
            continue
        if type(linear) is not nn.Linear or not prefix.startswith("model.layers."):
            raise ModelLoadError(
                f"{listing}: tensor {name}: only the decoder layers' projections can hold fp8 "
                "weights here"
            )
        fp8 = Fp8Linear.empty_like(linear)
        setattr(parent, leaf, fp8)
        slots[f"{prefix}.weight"] = Fp8Tensor(fp8, "weight")
        slots[name] = Fp8Tensor(fp8, "weight_scale")
        slots[f"{prefix}.{INPUT_SCALE}"] = Fp8Tensor(fp8, "input_scale")
        if fp8.bias is not None:
            slots[f"{prefix}.bias"] = Fp8Tensor(fp8, "bias")
    if not slots:
        raise ModelLoadError(
            f"{listing}: config.json declares fp8 weights (quantization_config) but no "
            f"tensor ends in {suffix}"
        )
    return slots


def _tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names.extend(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors: {exc}") from exc
    return names


__all__ = ["Fp8Tensor", "check_shape", "install_fp8_layers"]
