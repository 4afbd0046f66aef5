"""Weight-only int8 and fp8 linear layers, swapped in behind one small interface.

:func:`quantize_model` replaces the ``nn.Linear`` modules inside the decoder layers
(attention and MLP projections; never the embeddings or ``lm_head``) with a
quantized module built by ``from_linear``. Both kinds keep one scale per output
channel (symmetric), stored as buffers so that ``.to()``, sleep and wake move them
with the model.

- :class:`Int8WeightOnlyLinear`: int8 weights; the matmul runs in the activation
  dtype on the dequantized weight, the scale applied to the output
  (``(x @ W_q^T) * s`` equals ``x @ (W_q * s)^T``).
- :class:`Fp8Linear`: float8 e4m3 weights. On a CUDA device that has fp8 matrix
  units (compute capability 8.9+: Ada, Hopper), activations are quantized per token
  on the fly and ``torch._scaled_mm`` multiplies the two fp8 operands with row-wise
  scales. Elsewhere (CPU, older GPUs, shapes not divisible by 16) it dequantizes.

This module knows nothing about the engine; it only needs a model whose decoder
layers sit in ``model.model.layers`` (or are passed in).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
#: the largest finite float8 e4m3fn value
FP8_MAX = 448.0
INT8_MAX = 127.0
#: keeps all-zero rows from dividing by zero
_MIN_SCALE = 1e-12


class QuantizedLinear(nn.Module):
    """What every quantized replacement of ``nn.Linear`` provides."""

    in_features: int
    out_features: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


def _channel_scales(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    """(out,) float32 symmetric scales: the largest |w| of each row maps to ``qmax``."""
    return (weight.float().abs().amax(dim=1) / qmax).clamp(min=_MIN_SCALE)


class Int8WeightOnlyLinear(QuantizedLinear):
    """``y = (x @ W_q^T) * scale + b`` with ``W_q`` int8 (out, in) and ``scale`` (out,)."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
            raise ValueError(
                f"weight must be a 2-D int8 tensor, got {weight_q.dtype} {weight_q.shape}"
            )
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        w = linear.weight.detach()
        scale = _channel_scales(w, INT8_MAX)  # (out,)
        w_q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


@functools.cache
def _fp8_matmul_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device`` (CUDA, compute capability 8.9+);
    cached, as every eager fp8 forward asks."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization: ``x`` (M, K) -> (fp8 (M, K), float32 scales (M, 1)).
    On CUDA one Triton launch (:func:`~lmfleet.engine.layers.triton_fused.quantize_fp8_rows`)
    does what these torch ops do."""
    if x.device.type == "cuda" and _fused_quant_available():
        from lmfleet.engine.layers.triton_fused import quantize_fp8_rows as fused

        return fused(x, FP8_MAX, _MIN_SCALE)
    return _quantize_fp8_rows_torch(x)


@functools.cache
def _fused_quant_available() -> bool:
    from lmfleet.engine.layers.triton_attention import triton_available

    return triton_available()


def _quantize_fp8_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`quantize_fp8_rows`, in torch ops."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)  # (M, 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric fp8: ``weight`` (out, in) -> (float8 e4m3 (out, in),
    float32 scales (out,)) with ``weight ~ q * scale[:, None]``, the largest |w| of a
    row mapping to 448."""
    scale = _channel_scales(weight, FP8_MAX)  # (out,)
    w_q = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w_q, scale


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """Block-wise fp8 back to float32: ``weight`` (out, in) float8 times the scale of
    its ``block`` = (bn, bk) tile, ``scale`` being (ceil(out / bn), ceil(in / bk));
    partial tiles at the edges take their tile's scale. Exact: an e4m3 value times an
    fp32 scale rounds at most once, in fp32."""
    return weight.float() * expand_block_scales(scale, block, weight.shape)  # (out, in)


def expand_block_scales(
    scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """Per-tile scales (ceil(out / bn), ceil(in / bk)) as one float32 scale per
    element of an (out, in) ``shape``."""
    bn, bk = block
    out, inp = shape
    return scale.float().repeat_interleave(bn, dim=0)[:out].repeat_interleave(bk, dim=1)[:, :inp]


class Fp8Linear(QuantizedLinear):
    """float8 e4m3 weights (out, in) with per-output-channel float32 scales (out,).

    ``use_scaled_mm=None`` decides per call: fp8 matrix units when the device has
    them and both ``in_features`` and ``out_features`` are multiples of 16."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        use_scaled_mm: bool | None = None,
    ):
        super().__init__()
        if weight_q.dtype != FP8_DTYPE or weight_q.dim() != 2:
            raise ValueError(
                f"weight must be a 2-D {FP8_DTYPE} tensor, got {weight_q.dtype} {weight_q.shape}"
            )
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)
        self.use_scaled_mm = use_scaled_mm
        self._aligned = self.in_features % 16 == 0 and self.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w = linear.weight.detach()
        w_q, scale = quantize_fp8_weight(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_q, scale, bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> Fp8Linear:
        """An uninitialised stand-in for ``linear`` on ``linear``'s device (``meta``
        while a checkpoint loads), to be filled with stored fp8 weights and scales."""
        device = linear.weight.device
        out, inp = linear.out_features, linear.in_features
        bias = None
        if linear.bias is not None:
            bias = torch.empty(out, dtype=linear.bias.dtype, device=device)
        return cls(
            torch.empty(out, inp, dtype=FP8_DTYPE, device=device),
            torch.empty(out, dtype=torch.float32, device=device),
            bias,
        )

    @classmethod
    def concat(cls, layers: Iterable[Fp8Linear]) -> Fp8Linear:
        """One layer whose output is ``layers``' outputs side by side (fp8 rows and
        per-row scales stacked: per-channel scaling makes this exact)."""
        layers = list(layers)
        if len({lin.in_features for lin in layers}) != 1:
            raise ValueError("concatenated layers must share in_features")
        if len({lin.bias is None for lin in layers}) != 1:
            raise ValueError("either every concatenated layer has a bias or none has")
        # float8 has no cat kernel on every backend: stack the bytes
        weight = torch.cat([lin.weight.view(torch.uint8) for lin in layers]).view(FP8_DTYPE)
        scale = torch.cat([lin.scale for lin in layers])
        bias = None
        if layers[0].bias is not None:
            bias = torch.cat([lin.bias for lin in layers if lin.bias is not None])
        return cls(weight, scale, bias, use_scaled_mm=layers[0].use_scaled_mm)

    def _scaled_mm_on(self, x: torch.Tensor) -> bool:
        if self.use_scaled_mm is not None:
            return self.use_scaled_mm
        return self._aligned and _fp8_matmul_supported(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scaled_mm_on(x):
            return self.forward_scaled_mm(x)
        # dequantize: exact weights of the fp8 grid, matmul in the activation dtype
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 x fp8 through ``torch._scaled_mm`` with row-wise scales: activations
        per token (M, 1), weights per output channel (1, N); bf16 output."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        x_q, x_scale = quantize_fp8_rows(x2)
        y = torch._scaled_mm(
            x_q,
            self.weight.t(),  # (K, N), column-major as required
            scale_a=x_scale,
            scale_b=self.scale.view(1, -1),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )  # (M, N)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


QUANT_METHODS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8WeightOnlyLinear,
    "fp8": Fp8Linear,
}


def quantize_linears(modules: Iterable[nn.Module], method: str) -> int:
    """Replace every ``nn.Linear`` child inside ``modules`` by ``method``'s quantized
    layer; returns how many were replaced."""
    if method not in QUANT_METHODS:
        raise ValueError(
            f"quantization method must be one of {sorted(QUANT_METHODS)}, got {method!r}"
        )
    cls = QUANT_METHODS[method]
    count = 0
    for root in modules:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, cls.from_linear(child))
                    count += 1
    return count


def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize the projections of ``model``'s decoder layers (``model.model.layers``)
    in place with ``method`` (``"int8"`` or ``"fp8"``); embeddings and ``lm_head``
    stay as they are. Call it after weights are loaded (and after
    ``fuse_projections``, so the fused projections are the ones quantized). Returns
    the number of linear layers replaced."""
    if method not in QUANT_METHODS:
        raise ValueError(
            f"quantization method must be one of {sorted(QUANT_METHODS)}, got {method!r}"
        )
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no model.layers; pass its decoder layers to "
            "quantize_linears instead"
        )
    count = quantize_linears(layers, method)
    if model.training:
        model.eval()
    return count
