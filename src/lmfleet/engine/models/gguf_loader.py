"""Load a GGUF checkpoint (llama.cpp's format) into a decoder.

The architecture comes from the metadata under the file's ``general.architecture``
prefix (``llama``, which Mistral's GGUFs use too; ``qwen2``; ``qwen3``), plus what
only the tensor table tells (biases, tied embeddings). Tensors are renamed from
llama.cpp's names (``blk.N.attn_q.weight``) to the Hugging Face ones the decoder
uses, and read one at a time: raw bytes from the file, dequantized by
:mod:`lmfleet.engine.models.gguf_quants` on the target device, cast to the target
dtype and assigned (the model is built on ``meta``, so no second copy of the
weights exists). llama.cpp's converter reorders the rows of each ``llama`` q and k
projection from the rotate-half layout to interleaved pairs; that permutation is
undone here. Anything the decoder cannot run raises
:class:`~lmfleet.errors.ModelLoadError` naming the file and the key or tensor.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmfleet.engine.models.config import ArchConfig
from lmfleet.engine.models.gguf_file import GGUFHeader, GGUFTensor, read_header, read_tensor_bytes
from lmfleet.engine.models.gguf_quants import FORMATS, dequantize, supported_types, type_name
from lmfleet.engine.models.loader import LoadedModel, assign_parameter, weights_progress
from lmfleet.engine.models.registry import resolve
from lmfleet.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: ``general.architecture`` -> the Hugging Face architecture the decoder implements
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
#: architectures whose q/k rows llama.cpp's converter permutes for its rope kernel
_PERMUTED_QK = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(name: str) -> str | None:
    """The decoder's parameter name for a llama.cpp tensor name (None: unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"


# ---------------------------------------------------------------------------- config


def _int(header: GGUFHeader, key: str, default: int | None = None) -> int:
    value = header.metadata.get(key, default)
    if isinstance(value, list):
        raise ModelLoadError(
            f"{header.path}: {key} differs between layers ({value[:4]}...); per-layer "
            "shapes are unsupported"
        )
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelLoadError(f"{header.path}: metadata key {key} missing or not an integer")
    return value


def _float(header: GGUFHeader, key: str, default: float) -> float:
    value = header.metadata.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ModelLoadError(f"{header.path}: metadata key {key} is not a number: {value!r}")
    return float(value)


def _eos_ids(meta: Any) -> tuple[int, ...]:
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = (meta.get(f"tokenizer.ggml.{k}") for k in keys)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))


def _stored_dtype(header: GGUFHeader) -> str | None:
    """``float16`` or ``bfloat16`` when every matrix is stored so (the GPU default)."""
    kinds = {t.qtype for t in header.tensors if len(t.shape) == 2}
    names = {type_name(k) for k in kinds}
    return {"F16": "float16", "BF16": "bfloat16"}.get(names.pop()) if len(names) == 1 else None


def arch_from_gguf(header: GGUFHeader) -> ArchConfig:
    """The decoder's :class:`ArchConfig` for a GGUF file."""
    src, meta = header.path, header.metadata
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{src}: GGUF architecture {arch!r} is unsupported; supported: "
            f"{', '.join(ARCHITECTURES)} (Mistral GGUFs are written as llama)"
        )
    if meta.get(f"{arch}.expert_count"):
        raise ModelLoadError(f"{src}: mixture-of-experts {arch} models are unsupported")
    p = f"{arch}."
    hidden = _int(header, p + "embedding_length")
    heads = _int(header, p + "attention.head_count")
    kv_heads = _int(header, p + "attention.head_count_kv", heads)
    head_dim = _int(header, p + "attention.key_length", hidden // heads if heads else 0)
    if _int(header, p + "attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{src}: {p}attention.value_length != key_length is unsupported")
    if _int(header, p + "rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(
            f"{src}: {p}rope.dimension_count {meta[p + 'rope.dimension_count']} != head_dim "
            f"{head_dim}: partial rotary embeddings are unsupported"
        )
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none") and _float(header, p + "rope.scaling.factor", 1.0) != 1.0:
        raise ModelLoadError(f"{src}: {p}rope.scaling.type {scaling!r} is unsupported")
    if "rope_freqs.weight" in header.by_name:
        raise ModelLoadError(
            f"{src}: tensor rope_freqs.weight (Llama 3.1-style rope frequency factors) is "
            "unsupported; load the Hugging Face checkpoint instead"
        )
    embed = header.by_name.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise ModelLoadError(f"{src}: missing tensor token_embd.weight")
    vocab = embed.shape[0]
    if meta.get(p + "vocab_size", vocab) != vocab:
        raise ModelLoadError(
            f"{src}: {p}vocab_size {meta[p + 'vocab_size']} != token_embd.weight rows {vocab}"
        )
    has = header.by_name.__contains__
    window = meta.get(p + "attention.sliding_window")
    return ArchConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(header, p + "feed_forward_length"),
        num_hidden_layers=_int(header, p + "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(header, p + "attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=_float(header, p + "rope.freq_base", 10000.0),
        rope_scaling=None,
        max_position_embeddings=_int(header, p + "context_length"),
        tie_word_embeddings=not has("output.weight"),
        attention_bias=has("blk.0.attn_q.bias"),
        attention_out_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_up.bias"),
        qk_norm=has("blk.0.attn_q_norm.weight"),
        sliding_window=window if isinstance(window, int) and window > 0 else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=_eos_ids(meta),
        torch_dtype=_stored_dtype(header),
        source=str(src),
    )


def arch_from_file(path: str | Path) -> ArchConfig:
    return arch_from_gguf(read_header(path))


# ---------------------------------------------------------------------------- weights


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, rows ``2i`` and ``2i + 1``
    (an interleaved rotary pair) go back to ``i`` and ``i + head_dim / 2``.
    ``weight`` is (num_heads * head_dim, ...) (a weight or a bias)."""
    rows = weight.shape[0]
    pairs = rows // num_heads // 2
    # (heads, pairs, 2, ...) -> (heads, 2, pairs, ...)
    return (
        weight.reshape(num_heads, pairs, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def _check_tensor(header: GGUFHeader, t: GGUFTensor, params: dict[str, nn.Parameter]) -> str:
    name = hf_name(t.name)
    if name is None or name not in params:
        raise ModelLoadError(f"{header.path}: unexpected tensor {t.name} (not in the model)")
    if t.qtype not in FORMATS:
        raise ModelLoadError(
            f"{header.path}: tensor {t.name} is stored as {type_name(t.qtype)}, which lmfleet "
            f"cannot dequantize; supported: {supported_types()}"
        )
    want = tuple(params[name].shape)
    if t.shape != want:
        raise ModelLoadError(
            f"{header.path}: tensor {t.name} has shape {list(t.shape)}, the model expects "
            f"{list(want)} for {name}"
        )
    return name


def load_gguf_model(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool = True,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Build the decoder of the GGUF file at ``path`` with its weights dequantized
    to ``dtype`` on ``device`` (see :func:`lmfleet.engine.models.loader.load_model`)."""
    device = torch.device(device)
    start = time.perf_counter()
    header = read_header(path)
    arch = arch_from_gguf(header)
    max_len = max_model_len or arch.max_position_embeddings
    arch.check_max_model_len(max_len)
    with torch.device("meta"):
        model = resolve(arch)(arch, max_positions=max_len)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = {t.name: _check_tensor(header, t, params) for t in header.tensors}
    permuted = header.architecture in _PERMUTED_QK
    heads = {"q_proj": arch.num_attention_heads, "k_proj": arch.num_key_value_heads}

    loaded: set[str] = set()
    total = header.num_bytes
    with weights_progress(total, progress) as bar, header.path.open("rb") as f:
        for t in header.tensors:
            name = names[t.name]
            if name in loaded:
                raise ModelLoadError(f"{header.path}: tensor {t.name} is stored twice")
            raw = read_tensor_bytes(f, t, header.path).to(device)
            try:
                tensor = dequantize(raw, t.qtype, t.shape, dtype)
            except ValueError as exc:
                raise ModelLoadError(f"{header.path}: tensor {t.name}: {exc}") from exc
            proj = name.rsplit(".", 2)[-2]
            if permuted and proj in heads:
                tensor = unpermute_qk(tensor, heads[proj]).contiguous()
            assign_parameter(model, name, tensor)
            loaded.add(name)
            del raw
            bar.update(t.nbytes)

    if arch.tie_word_embeddings:  # no output.weight: the head reads the embeddings
        model.lm_head.weight = model.model.embed_tokens.weight
    tied = arch.tie_word_embeddings
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{header.path}: missing tensor for {missing[0]}{more}")
    model.init_buffers(device)
    model.eval()
    seconds = time.perf_counter() - start
    rate = total / seconds if seconds > 0 else float("inf")
    kinds = sorted({type_name(t.qtype) for t in header.tensors})
    logger.info(
        "loaded %s (GGUF %s, %s) from %s as %s: %.1f MB in %.2fs, %.1f MB/s",
        arch.architecture,
        header.metadata.get("general.name", header.architecture),
        "/".join(kinds),
        header.path,
        str(dtype).removeprefix("torch."),
        total / 1e6,
        seconds,
        rate / 1e6,
    )
    return LoadedModel(model, arch, total, seconds, rate)
