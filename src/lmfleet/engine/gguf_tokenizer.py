"""A :class:`~lmfleet.engine.tokenizer.Tokenizer` built from a GGUF file's metadata.

GGUF files carry no ``tokenizer.json``; llama.cpp stores the vocabulary under
``tokenizer.ggml.*`` instead. For ``tokenizer.ggml.model == "gpt2"`` (byte-level
BPE: SmolLM, Qwen, Llama 3, Mistral's Tekken-free releases...) this module rebuilds
a ``tokenizers`` BPE from ``tokens`` and ``merges``, with the pre-tokenizer that
``tokenizer.ggml.pre`` names (the split rules its merges were learned with), a
byte-level decoder, control tokens (token type 3) as special added tokens and
user-defined ones (type 4) as plain added tokens, bos/eos/unk/pad from their ids,
``add_bos_token``/``add_eos_token`` from the metadata, and the chat templates
from ``tokenizer.chat_template`` (and ``tokenizer.chat_template.NAME``).
SentencePiece vocabularies (``llama``) are refused: pass the model's Hugging Face
tokenizer directory (``--tokenizer DIR``) instead.

Like the rest of tokenization, this knows nothing about models or the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.engine.models.gguf_file import GGUFHeader, read_header
from lmfleet.engine.tokenizer import Tokenizer, check_chat_templates
from lmfleet.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: llama.cpp's token types (``tokenizer.ggml.token_type``)
CONTROL, USER_DEFINED = 3, 4

#: Llama 3's split: contractions, letters with one leading non-letter, digits in
#: threes, punctuation runs, newlines, other whitespace
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2's: Llama 3's with every digit on its own
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2_bytes() -> pre_tokenizers.PreTokenizer:
    # GPT-2's own split ('s|'t|... ?\p{L}+| ?\p{N}+|...) is ByteLevel's built-in regex
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_bytes()])


#: ``tokenizer.ggml.pre`` -> (pre-tokenizer factory, whether whole-word vocabulary
#: hits skip the merges, as Llama 3's tokenizer.json says with ``ignore_merges``)
PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    "default": (_gpt2_bytes, False),
    "gpt-2": (_gpt2_bytes, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "qwen2": (lambda: _regex_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (lambda: _regex_then_bytes(_QWEN2_SPLIT), False),
    "llama-bpe": (lambda: _regex_then_bytes(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _regex_then_bytes(_LLAMA3_SPLIT), True),
}


def _fail(header: GGUFHeader, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{header.path}: {what}; pass --tokenizer DIR with the model's Hugging Face "
        "tokenizer (tokenizer.json) instead"
    )


def _list(header: GGUFHeader, key: str) -> list[Any]:
    value = header.metadata.get(key)
    if not isinstance(value, list) or not value:
        raise _fail(header, f"metadata key {key} is missing")
    return value


def _backend(header: GGUFHeader) -> HFTokenizer:
    meta = header.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        what = "SentencePiece " if kind == "llama" else ""
        raise _fail(header, f"tokenizer.ggml.model {kind!r} ({what}vocabulary) is unsupported")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise _fail(
            header,
            f"tokenizer.ggml.pre {pre!r} is unsupported (supported: {', '.join(PRE_TOKENIZERS)})",
        )
    tokens = _list(header, "tokenizer.ggml.tokens")
    merges = _list(header, "tokenizer.ggml.merges")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise _fail(header, f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise _fail(header, "tokenizer.ggml.tokens lists a token twice")
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    backend = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre()
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == USER_DEFINED]
    if control:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return backend


def _chat_templates(header: GGUFHeader) -> dict[str, str]:
    templates: dict[str, str] = {}
    prefix = "tokenizer.chat_template"
    for key, value in header.metadata.items():
        if isinstance(value, str) and (key == prefix or key.startswith(prefix + ".")):
            templates[key.removeprefix(prefix).removeprefix(".") or "default"] = value
    return templates


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """The tokenizer the GGUF file at ``path`` describes (see the module docstring)."""
    header = read_header(path)
    meta = header.metadata
    backend = _backend(header)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        name: content
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if (content := token(key)) is not None
    }
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    extra_eos = [
        i
        for k in ("eot_token_id", "eom_token_id")
        if isinstance(i := meta.get(f"tokenizer.ggml.{k}"), int)
    ]
    templates = _chat_templates(header)
    check_chat_templates(templates, header.path)
    logger.debug(
        "GGUF tokenizer: %d tokens, pre-tokenizer %s, %d chat templates",
        len(tokens),
        meta.get("tokenizer.ggml.pre", "default"),
        len(templates),
    )
    return Tokenizer(backend, config, extra_eos_ids=extra_eos, chat_templates=templates)
