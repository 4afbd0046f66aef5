"""GGML tensor storage types decoded into torch tensors.

A GGUF file stores each tensor as rows of fixed-size blocks along its innermost
dimension: F32, F16 and BF16 as plain values; the legacy quants (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0) as blocks of 32 values with an fp16 scale (and minimum); the K-quants
(Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as super-blocks of 256 values split into 16 or 8
sub-blocks whose scales are themselves quantized. :func:`dequantize` turns the raw
bytes of one tensor into a tensor of the wanted dtype on the bytes' device, in
chunks of blocks (so the float32 temporaries stay small), with vectorized integer
ops only: it runs on CPU and GPU alike. The ``gguf`` package's numpy
``gguf.quants.dequantize`` is the reference the tests compare against.

This module knows nothing about files or models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

#: blocks decoded at once: bounds the float32 temporaries (about 16 MiB per chunk
#: of 32-value blocks, 128 MiB of 256-value ones)
_CHUNK_BLOCKS = 1 << 17


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """How one storage type packs ``block_size`` values into ``type_size`` bytes."""

    name: str
    block_size: int
    type_size: int
    #: (N, type_size) uint8 -> (N, block_size) float32; None for the plain float types
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


# ---------------------------------------------------------------------------- helpers


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at byte ``offset`` of each block, as (N, 1) float32."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, k) bytes -> (N, 2k): all low nibbles, then all high nibbles."""
    n, k = qs.shape
    out = torch.empty(n, 2, k, dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(n, 2 * k)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """(N, k) bytes -> (N, 8k) of 0/1, bit i of the little-endian bit string at i."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)


def _shifted(values: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """``(values >> s) & mask`` for each shift ``s``, stacked before the last dim."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=values.device)
    return (values.unsqueeze(-2) >> s.view(-1, 1)) & mask  # (..., len(shifts), k)


def _k_scales_6bit(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums, (N, 8) each.
    The first four of each sit in the low 6 bits of bytes 0-3 (scales) and 4-7
    (minimums); the last four take their low 4 bits from bytes 8-11 and their high 2
    bits from the top of bytes 0-3 and 4-7."""
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


# ---------------------------------------------------------------------------- legacy quants


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d: f16, qs: int8[32]
    return b[:, 2:].view(torch.int8) * _f16(b, 0)


# the same operations in the same order as the reference, so the same roundings:
# d * (q - offset) with the offset taken off in int8, or d * q then + m


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d, qs[16]: x = d * (q - 8)
    return _nibbles(b[:, 2:18]).view(torch.int8).sub_(8) * _f16(b, 0)


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d, m, qs[16]: x = d * q + m
    return (_nibbles(b[:, 4:20]) * _f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d, qh[4], qs[16]: x = d * (q5 - 16)
    q = _nibbles(b[:, 6:22]).bitwise_or_(_bits(b[:, 2:6]) << 4)  # (N, 32)
    return q.view(torch.int8).sub_(16) * _f16(b, 0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d, m, qh[4], qs[16]: x = d * q5 + m
    q = _nibbles(b[:, 8:24]).bitwise_or_(_bits(b[:, 4:8]) << 4)  # (N, 32)
    return (q * _f16(b, 0)).add_(_f16(b, 2))


# ---------------------------------------------------------------------------- K-quants
# Output value y of a 256-value super-block: the comments give y's index in terms of
# the loop variables of the layout, and the tensors are shaped in that order.


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble scale, high nibble min), qs[64], d, dmin
    # y[128 n + 32 j + 16 k + l] = d * sc[8n+2j+k] * ((qs[32n+16k+l] >> 2j) & 3) - dmin * m[..]
    n = b.shape[0]
    sc = b[:, 0:16].reshape(n, 2, 4, 2, 1)
    q = _shifted(b[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 3)  # (N, 2, 4, 32)
    q = q.reshape(n, 2, 4, 2, 16).float()
    d, dmin = _f16(b, 80).view(n, 1, 1, 1, 1), _f16(b, 82).view(n, 1, 1, 1, 1)
    y = d * (sc & 0x0F).float() * q - dmin * (sc >> 4).float()
    return y.reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask[32], qs[64], scales[12] (16 six-bit scales, offset 32), d
    # y[128 n + 32 j + 16 k + l] = d * (sc[8n+2j+k] - 32)
    #     * (((qs[32n+16k+l] >> 2j) & 3) - (hmask[16k+l] bit (4n+j) ? 0 : 4))
    n = b.shape[0]
    packed = b[:, 96:108]
    low = _nibbles(packed[:, 0:8])  # (N, 16): scale i's low 4 bits
    high = _shifted(packed[:, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)  # i's high 2 bits
    sc = ((low | (high << 4)).float() - 32).reshape(n, 2, 4, 2, 1)
    q = _shifted(b[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 3)  # (N, 2, 4, 32)
    h = _shifted(b[:, 0:32], list(range(8)), 1).reshape(n, 2, 4, 32)  # bit 4n+j
    q = (q.float() + 4 * h.float() - 4).reshape(n, 2, 4, 2, 16)
    return (_f16(b, 108).view(n, 1, 1, 1, 1) * sc * q).reshape(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12] (8 six-bit scales and mins), qs[128]
    # y[64 c + 32 h + l] = d * sc[2c+h] * nibble_h(qs[32c+l]) - dmin * m[2c+h]
    n = b.shape[0]
    sc, mn = _k_scales_6bit(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).float()  # (N, 4, 2, 32)
    d, dmin = _f16(b, 0).view(n, 1, 1, 1), _f16(b, 2).view(n, 1, 1, 1)
    y = d * sc.view(n, 4, 2, 1) * q - dmin * mn.view(n, 4, 2, 1)
    return y.reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qh[32], qs[128]
    # y[64 c + 32 h + l] = d * sc[2c+h] * (nibble_h(qs[32c+l]) + 16 * qh[l] bit (2c+h)) - ..
    n = b.shape[0]
    sc, mn = _k_scales_6bit(b[:, 4:16])
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    low = torch.cat((qs & 0x0F, qs >> 4), dim=2)  # (N, 4, 2, 32)
    high = _shifted(b[:, 16:48], list(range(8)), 1).reshape(n, 4, 2, 32)
    q = (low | (high << 4)).float()
    d, dmin = _f16(b, 0).view(n, 1, 1, 1), _f16(b, 2).view(n, 1, 1, 1)
    y = d * sc.view(n, 4, 2, 1) * q - dmin * mn.view(n, 4, 2, 1)
    return y.reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql[128], qh[64], scales: int8[16], d
    # y[128 n + 32 t + l]: low 4 bits from ql[64n + 32 (t % 2) + l] (nibble t // 2),
    # high 2 bits (qh[32n + l] >> 2t) & 3, minus 32, times d * sc[8n + 2t + l // 16]
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)  # (N, 2, 4, 32)
    high = _shifted(b[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 3)  # (N, 2, 4, 32)
    q = ((low | (high << 4)).float() - 32).reshape(n, 2, 4, 2, 16)
    sc = b[:, 192:208].view(torch.int8).float().reshape(n, 2, 4, 2, 1)
    return (_f16(b, 208).view(n, 1, 1, 1, 1) * sc * q).reshape(n, 256)


_T = GGMLQuantizationType
#: the storage types :func:`dequantize` reads, by GGML type id
FORMATS: dict[int, BlockFormat] = {
    _T.F32: BlockFormat("F32", 1, 4),
    _T.F16: BlockFormat("F16", 1, 2),
    _T.BF16: BlockFormat("BF16", 1, 2),
    _T.Q8_0: BlockFormat("Q8_0", 32, 34, _q8_0),
    _T.Q4_0: BlockFormat("Q4_0", 32, 18, _q4_0),
    _T.Q4_1: BlockFormat("Q4_1", 32, 20, _q4_1),
    _T.Q5_0: BlockFormat("Q5_0", 32, 22, _q5_0),
    _T.Q5_1: BlockFormat("Q5_1", 32, 24, _q5_1),
    _T.Q2_K: BlockFormat("Q2_K", 256, 84, _q2_k),
    _T.Q3_K: BlockFormat("Q3_K", 256, 110, _q3_k),
    _T.Q4_K: BlockFormat("Q4_K", 256, 144, _q4_k),
    _T.Q5_K: BlockFormat("Q5_K", 256, 176, _q5_k),
    _T.Q6_K: BlockFormat("Q6_K", 256, 210, _q6_k),
}
_PLAIN = {_T.F32: torch.float32, _T.F16: torch.float16, _T.BF16: torch.bfloat16}


def type_name(qtype: int) -> str:
    """``"Q4_K"`` for a GGML type id, ``"type 99"`` for one the gguf package lacks."""
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def supported_types() -> str:
    return ", ".join(f.name for f in FORMATS.values())


def dequantize(
    raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The tensor of ``shape`` (torch order: the GGUF dimensions reversed) stored in
    ``raw`` (1-D uint8) as ``qtype``, as ``dtype`` on ``raw``'s device.

    Raises ``ValueError`` for an unsupported type or a byte count that does not fit."""
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise ValueError(f"storage type {type_name(qtype)} is unsupported")
    numel = 1
    for dim in shape:
        numel *= dim
    if shape and shape[-1] % fmt.block_size:
        raise ValueError(
            f"{fmt.name} packs rows in blocks of {fmt.block_size}; a row of {shape[-1]} "
            "values does not fill whole blocks"
        )
    num_blocks = numel // fmt.block_size
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != num_blocks * fmt.type_size:
        raise ValueError(
            f"{fmt.name} tensor of shape {list(shape)} needs {num_blocks * fmt.type_size} "
            f"bytes, got {raw.numel()}"
        )
    if fmt.decode is None:
        return raw.view(_PLAIN[qtype]).view(shape).to(dtype)
    blocks = raw.view(num_blocks, fmt.type_size)
    if num_blocks <= _CHUNK_BLOCKS:  # one chunk: no copy into an output buffer
        return fmt.decode(blocks).to(dtype).view(shape)
    out = torch.empty(num_blocks, fmt.block_size, dtype=dtype, device=raw.device)
    for start in range(0, num_blocks, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, num_blocks)
        out[start:stop] = fmt.decode(blocks[start:stop])
    return out.view(shape)
