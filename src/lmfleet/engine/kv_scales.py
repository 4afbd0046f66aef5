"""Per-layer scales of an fp8 KV cache: from the checkpoint, or calibrated at startup.

float8 e4m3 spans about 2^-9 to 448 with 3 mantissa bits. With a scale of 1.0 (what
vLLM and TGI use when a checkpoint has none) a layer whose keys reach beyond 448
saturates them, and small values lose their mantissa or flush to zero. Models do
have such layers: vLLM measured Qwen2-7B's perplexity at 34.8 with unit scales and
22.6 with scales computed from the data (vllm-project/vllm#11906). So each layer
stores ``k / k_scale`` and ``v / v_scale`` and reads back ``stored * scale``.

Where the scales come from (``--kv-cache-scales``):

- ``checkpoint``: fp8-KV checkpoints (llm-compressor, ModelOpt, Quark) carry scalar
  tensors ``model.layers.N.self_attn.k_scale`` and ``v_scale`` (older ones one
  ``kv_scale`` for both; ModelOpt writes ``k_proj.k_scale`` and ``v_proj.v_scale``,
  older llm-compressor and AutoFP8 exports ``k_proj.output_scale`` and
  ``v_proj.output_scale``).
  :func:`checkpoint_kv_scales` reads them; ``auto`` uses them when present.
- ``calibrate``: one prefill of :data:`CALIBRATION_TEXT` through the model with a
  full-precision scratch cache records each layer's largest ``|K|`` and ``|V|``;
  :func:`scales_from_amax` maps them to ``K_TARGET`` and ``V_TARGET`` (well inside
  448, so values larger than any the text produced still fit). It runs before CUDA
  graphs are captured: the kernels take the scales as constants. (A model without a
  tokenizer gets 512 fixed-seed random token ids instead.) A built-in text,
  not the first request, so a warm-up or health probe cannot set the scales, and
  every replica of a model gets the same ones.
- ``unit``: 1.0 everywhere, the behaviour of the peers without checkpoint scales.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmfleet.engine.layers.attention import FP8_KV_MAX

#: what a layer's largest calibrated |K| is stored as: a bit under half of 448, so
#: keys up to 2.2x larger than the calibration text produced still fit (vLLM's
#: dynamic scales use the same target)
K_TARGET = 200.0
#: the same for |V|: up to 4.5x headroom (values vary more between texts than keys)
V_TARGET = 100.0
#: the scale of a layer whose calibration saw only zeros
DEFAULT_SCALE = 1.0

#: varied English prose, code, numbers and punctuation, so the calibration prefill
#: exercises the kinds of tokens real traffic brings (written for lmfleet)
CALIBRATION_TEXT = """\
The harbour office opens at seven, but the ferry to the northern islands leaves at \
6:45 on weekdays and 8:10 on Sundays. Tickets cost 14.50 EUR one way (children under \
12 travel free), and bicycles must be booked a day ahead: call +44 20 7946 0958 or \
write to bookings@example.org.

Q: Why does the sky look blue at noon but red at sunset?
A: Air molecules scatter short wavelengths far more strongly than long ones. At noon \
sunlight crosses little air, so the scattered blue fills the sky; at sunset the path \
is many times longer, the blue is scattered away before it reaches you, and mostly \
red and orange light is left.

def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

SELECT region, COUNT(*) AS orders, ROUND(AVG(total), 2) AS mean_total
FROM orders WHERE placed_at >= '2024-01-01' GROUP BY region ORDER BY orders DESC;

Recipe for four: 300 g rice, 1 litre stock, 2 onions, 150 ml white wine, 50 g \
butter, a handful of grated cheese. Stir often; the rice is done when it is soft \
but still has a slight bite, after about 18 minutes.

"I told you the bridge would be closed," she said, folding the map. "We'll go round \
by the old mill instead -- it adds ten kilometres, not forty."

Le musée est fermé le lundi. Die Bibliothek schließt um 20 Uhr. 図書館は月曜日休館です。
Temperatures today: Oslo -3°C, Lisbon 17°C, Nairobi 24°C, Anchorage -11°C.
"""

#: token ids of the calibration prefill when the model ships no tokenizer
CALIBRATION_RANDOM_TOKENS = 512

#: the tensor names of checkpoint KV scales, by layer: (layer, which) with which in
#: "k", "v" or "kv" (one scale for both)
_SCALE_NAME = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\."
    r"(?:(k|v|kv)_scale|k_proj\.(k)_scale|v_proj\.(v)_scale"
    r"|(k)_proj\.output_scale|(v)_proj\.output_scale)$"
)


def kv_scale_tensor_layer(name: str) -> tuple[int, str] | None:
    """``(layer, "k" | "v" | "kv")`` when ``name`` is a checkpoint's KV scale tensor."""
    match = _SCALE_NAME.match(name)
    if match is None:
        return None
    which = next(g for g in match.groups()[1:] if g)
    return int(match.group(1)), which


@dataclass(frozen=True, slots=True)
class KVScales:
    """One K and one V scale per layer, and where they came from."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    #: "unit", "checkpoint" or "calibrated"
    source: str
    #: tokens of the calibration prefill (0 unless calibrated)
    calibration_tokens: int = 0

    def __post_init__(self) -> None:
        if len(self.k) != len(self.v):
            raise ValueError(f"{len(self.k)} K scales but {len(self.v)} V scales")
        for value in (*self.k, *self.v):
            if not (0.0 < value < math.inf):
                raise ValueError(f"KV scales must be finite and > 0, got {value}")

    @classmethod
    def unit(cls, num_layers: int) -> KVScales:
        return cls((1.0,) * num_layers, (1.0,) * num_layers, "unit")

    def layer(self, index: int) -> tuple[float, float]:
        return self.k[index], self.v[index]

    def describe(self) -> str:
        """One log line: the source and the range of each kind of scale."""
        where = self.source
        if self.calibration_tokens:
            where += f" on {self.calibration_tokens} tokens"
        return (
            f"{where}: k_scale {min(self.k):.4g}..{max(self.k):.4g}, "
            f"v_scale {min(self.v):.4g}..{max(self.v):.4g} over {len(self.k)} layers "
            f"(stored = value / scale, saturating at +-{FP8_KV_MAX:g})"
        )


def scales_from_amax(
    k_amax: list[float],
    v_amax: list[float],
    calibration_tokens: int,
    k_target: float = K_TARGET,
    v_target: float = V_TARGET,
) -> KVScales:
    """Scales that store each layer's largest ``|K|`` as ``k_target`` and largest
    ``|V|`` as ``v_target``; a layer whose largest value is 0 (or not finite) gets
    :data:`DEFAULT_SCALE`."""

    def scale(amax: float, target: float) -> float:
        if not (0.0 < amax < math.inf):
            return DEFAULT_SCALE
        return amax / target

    return KVScales(
        tuple(scale(a, k_target) for a in k_amax),
        tuple(scale(a, v_target) for a in v_amax),
        "calibrated",
        calibration_tokens,
    )


def checkpoint_kv_scales(found: Mapping[tuple[int, str], float], num_layers: int) -> KVScales:
    """The :class:`KVScales` of the scale tensors a checkpoint holds, keyed by
    :func:`kv_scale_tensor_layer`. Every layer needs a K and a V scale (a ``kv``
    scale gives both); raises ``ValueError`` naming the first one missing or bad."""
    k: list[float] = []
    v: list[float] = []
    for layer in range(num_layers):
        both = found.get((layer, "kv"))
        for which, into in (("k", k), ("v", v)):
            value = found.get((layer, which), both)
            if value is None:
                raise ValueError(
                    f"the checkpoint has KV scales but none for layer {layer}'s {which.upper()} "
                    f"(model.layers.{layer}.self_attn.{which}_scale)"
                )
            if not (0.0 < value < math.inf):
                raise ValueError(
                    f"model.layers.{layer}.self_attn.{which}_scale must be finite and > 0, "
                    f"got {value}"
                )
            into.append(value)
    extra = sorted(layer for layer, _ in found if layer >= num_layers)
    if extra:
        raise ValueError(f"KV scales for layer {extra[0]}, but the model has {num_layers}")
    return KVScales(tuple(k), tuple(v), "checkpoint")


class AmaxObserver:
    """Wraps a layer's attention function and records the largest ``|K|`` and
    ``|V|`` it is given (on the device, no sync until :meth:`result`)."""

    def __init__(self, attn_fn: Callable[..., torch.Tensor]) -> None:
        self.attn_fn = attn_fn
        self.k_amax: torch.Tensor | None = None
        self.v_amax: torch.Tensor | None = None

    def __call__(self, q, k, v, kv_cache, meta, scale, *args, **kwargs) -> torch.Tensor:
        k_max, v_max = k.detach().abs().amax().float(), v.detach().abs().amax().float()
        if self.k_amax is None or self.v_amax is None:
            self.k_amax, self.v_amax = k_max, v_max
        else:
            self.k_amax = torch.maximum(self.k_amax, k_max)
            self.v_amax = torch.maximum(self.v_amax, v_max)
        return self.attn_fn(q, k, v, kv_cache, meta, scale, *args, **kwargs)

    def result(self) -> tuple[float, float]:
        """``(max |K|, max |V|)`` seen so far (0.0 before any call)."""
        if self.k_amax is None or self.v_amax is None:
            return 0.0, 0.0
        return self.k_amax.item(), self.v_amax.item()


def measure_kv_amax(
    attns: Sequence[Any], run: Callable[[], object]
) -> tuple[list[float], list[float]]:
    """Each layer's largest ``|K|`` and ``|V|`` while ``run()`` runs the model.

    ``attns`` are the layers' attention modules (``attn_fn``, ``attend_fn``,
    ``k_scale``, ``v_scale``, as ``LlamaAttention`` has them): for the call, each
    ``attn_fn`` is wrapped in an :class:`AmaxObserver`, ``attend_fn`` is None (so K/V
    go through ``attn_fn``, not a fused write) and the scales are 1.0 (``run`` should
    use a cache in the model dtype); all four are restored afterwards, also on error."""
    saved = [(a.attn_fn, a.attend_fn, a.k_scale, a.v_scale) for a in attns]
    observers = [AmaxObserver(a.attn_fn) for a in attns]
    try:
        for attn, observer in zip(attns, observers, strict=True):
            attn.attn_fn, attn.attend_fn, attn.k_scale, attn.v_scale = observer, None, 1.0, 1.0
        run()
    finally:
        for attn, state in zip(attns, saved, strict=True):
            attn.attn_fn, attn.attend_fn, attn.k_scale, attn.v_scale = state
    amax = [observer.result() for observer in observers]
    return [k for k, _ in amax], [v for _, v in amax]


__all__ = [
    "CALIBRATION_RANDOM_TOKENS",
    "CALIBRATION_TEXT",
    "K_TARGET",
    "V_TARGET",
    "AmaxObserver",
    "KVScales",
    "checkpoint_kv_scales",
    "kv_scale_tensor_layer",
    "measure_kv_amax",
    "scales_from_amax",
]
