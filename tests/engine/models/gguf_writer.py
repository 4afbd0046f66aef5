"""Test helper: write small GGUF files with the ``gguf`` package's own ``GGUFWriter``.

Weights are random with a fixed seed and stored as any GGML type: the types the
package can quantize go through ``gguf.quants.quantize``; for the K-quants, which it
cannot produce, :func:`random_blocks` builds valid blocks byte by byte (random
quants and sub-scales, small finite fp16 super-block scales). Tensors use
llama.cpp's names; ``llama`` files get their q/k rows permuted the way llama.cpp's
converter does, so a loader has to undo it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

#: where each K-quant block keeps its fp16 scales (d, and dmin where it has one)
_FP16_OFFSETS = {
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
K_QUANTS = tuple(_FP16_OFFSETS)
#: the types gguf.quants.quantize writes
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def random_blocks(
    rows: int, cols: int, qtype: Q, rng: np.random.Generator, scale: float = 0.002
) -> np.ndarray:
    """(rows, bytes per row) uint8 of random but valid ``qtype`` blocks."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in _FP16_OFFSETS[qtype]:
        d = np.abs(rng.normal(0, scale, size=n)).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """What ``GGUFWriter.add_tensor(..., raw_dtype=qtype)`` takes for ``values``
    (float32); K-quants ignore the values and get random blocks of the same shape."""
    if qtype in K_QUANTS:
        return random_blocks(values.shape[0], values.shape[-1], qtype, rng)
    if qtype not in QUANTIZABLE:  # never decoded: any bytes of the right size
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return rng.integers(
            0, 256, size=(values.shape[0], values.shape[-1] // block * size), dtype=np.uint8
        )
    return quants.quantize(values.astype(np.float32), qtype)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k reordering (rotate-half -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE spells bytes 0..255 with (printable Latin-1
    as itself, every other byte as chr(256 + k))."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


@dataclass
class TokenizerSpec:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str = "qwen2"
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    add_bos: bool | None = None
    chat_template: str | None = None


TINY_VOCAB = 262
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(pre: str = "qwen2") -> TokenizerSpec:
    """256 byte tokens, three merges and three control tokens: TINY_VOCAB ids, with
    <|endoftext|> (259) as pad, <|im_start|> (260) as bos, <|im_end|> (261) as eos."""
    tokens = [*byte_alphabet(), "Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 259 + [3, 3, 3]
    assert len(tokens) == len(types) == TINY_VOCAB
    return TokenizerSpec(
        tokens, ["Ġ t", "h e", "Ġt he"], types, pre, bos=260, eos=261, pad=259,
        chat_template=CHATML,
    )  # fmt: skip


def add_tokenizer(w: gguf.GGUFWriter, tok: TokenizerSpec) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    for value, add in (
        (tok.bos, w.add_bos_token_id),
        (tok.eos, w.add_eos_token_id),
        (tok.pad, w.add_pad_token_id),
    ):
        if value is not None:
            add(value)
    if tok.add_bos is not None:
        w.add_add_bos_token(tok.add_bos)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)


def write_tokenizer_gguf(path: Path, tok: TokenizerSpec, arch: str = "qwen2") -> Path:
    """A GGUF with tokenizer metadata only (no tensors)."""
    w = gguf.GGUFWriter(str(path), arch)
    add_tokenizer(w, tok)
    _finish(w)
    return path


@dataclass
class ModelSpec:
    arch: str = "qwen2"
    vocab: int = TINY_VOCAB
    hidden: int = 64
    ffn: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    context: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-6
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    #: storage type of the 2-D weights (norms and biases stay F32)
    matrix_type: Q = Q.Q8_0
    #: per-tensor storage types, by llama.cpp name, overriding ``matrix_type``
    types: Mapping[str, Q] = field(default_factory=dict)
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None
    seed: int = 0


def model_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Random float32 weights in torch (Hugging Face) row order, by llama.cpp name."""
    rng = np.random.default_rng(spec.seed)
    hd = spec.head_dim or spec.hidden // spec.heads
    q, kv = spec.heads * hd, spec.kv_heads * hd

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 0.1, size=(rows, cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {"token_embd.weight": mat(spec.vocab, spec.hidden)}
    for i in range(spec.layers):
        p = f"blk.{i}."
        out |= {
            p + "attn_norm.weight": norm(spec.hidden),
            p + "attn_q.weight": mat(q, spec.hidden),
            p + "attn_k.weight": mat(kv, spec.hidden),
            p + "attn_v.weight": mat(kv, spec.hidden),
            p + "attn_output.weight": mat(spec.hidden, q),
            p + "ffn_norm.weight": norm(spec.hidden),
            p + "ffn_gate.weight": mat(spec.ffn, spec.hidden),
            p + "ffn_up.weight": mat(spec.ffn, spec.hidden),
            p + "ffn_down.weight": mat(spec.hidden, spec.ffn),
        }
        if spec.qkv_bias:
            for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                out[p + name + ".bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if spec.qk_norm:
            out[p + "attn_q_norm.weight"] = norm(hd)
            out[p + "attn_k_norm.weight"] = norm(hd)
    out["output_norm.weight"] = norm(spec.hidden)
    if not spec.tied:
        out["output.weight"] = mat(spec.vocab, spec.hidden)
    return out


def write_model_gguf(path: Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Write ``spec`` to ``path``; returns the float32 weights before storage (torch
    row order: llama q/k not permuted). K-quant tensors hold other values (random
    blocks): compare those through a dequantizing reference."""
    tensors = model_tensors(spec)
    rng = np.random.default_rng(spec.seed + 1)
    a = spec.arch
    w = gguf.GGUFWriter(str(path), a)
    hd = spec.head_dim or spec.hidden // spec.heads
    keys: dict[str, Any] = {
        f"{a}.context_length": spec.context,
        f"{a}.embedding_length": spec.hidden,
        f"{a}.block_count": spec.layers,
        f"{a}.feed_forward_length": spec.ffn,
        f"{a}.attention.head_count": spec.heads,
        f"{a}.attention.head_count_kv": spec.kv_heads,
        f"{a}.rope.freq_base": float(spec.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(spec.eps),
        f"{a}.rope.dimension_count": hd,
        f"{a}.vocab_size": spec.vocab,
    }
    if spec.head_dim is not None:
        keys[f"{a}.attention.key_length"] = keys[f"{a}.attention.value_length"] = hd
    for key, value in {**keys, **spec.extra_metadata}.items():
        _add_value(w, key, value)
    if spec.tokenizer is not None:
        add_tokenizer(w, spec.tokenizer)
    for name, values in tensors.items():
        stored = values
        if a == "llama" and (".attn_q." in name or ".attn_k." in name):
            stored = llama_cpp_permute(values, spec.heads if ".attn_q." in name else spec.kv_heads)
        qtype = spec.types.get(name, spec.matrix_type if values.ndim == 2 else Q.F32)
        w.add_tensor(name, encode(stored, qtype, rng), raw_dtype=qtype)
    _finish(w)
    return tensors


def _add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, Sequence):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write {value!r}")


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
