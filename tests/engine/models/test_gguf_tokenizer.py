"""The tokenizer rebuilt from GGUF metadata encodes, decodes and renders chat
templates exactly as transformers' own GGUF tokenizer does: on the built-in
SmolLM2 file (pre-tokenizer ``smollm``) and on files written here that carry its
vocabulary under the ``qwen2`` and ``llama-bpe`` pre-tokenizers (with BOS added,
and user-defined tokens)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from lmfleet.engine.gguf_tokenizer import tokenizer_from_gguf
from lmfleet.engine.models.builtin import DEFAULT_MODEL, builtin_model_path
from lmfleet.engine.models.gguf_file import read_header
from lmfleet.engine.tokenizer import Tokenizer, load_tokenizer
from lmfleet.errors import ModelLoadError
from tests.engine.models.gguf_writer import (
    CHATML,
    TokenizerSpec,
    add_tokenizer,
    tiny_tokenizer,
    write_tokenizer_gguf,
)

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   inner runs,\ttabs\t\tand trailing   ",
    "\n\n\nnewlines\r\nand CRLF\r\n\r\n",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … ½ ≥ ∑",
    "emoji 🤖🚀 family 👨‍👩‍👧 flags 🇫🇷 skin 👍🏽",
    "日本語のテキスト、中文文本。한국어 텍스트. Ελληνικά кириллица עברית العربية",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, -3e10], "nested": {"ok": true, "none": null}}',
    "1234567890 3.14159 -42 1e-10 0x1F 1,000,000.00 $19.99 100% 2024-01-31",
    "it's we'll they're I'M IT'S don't",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep>y",
    "<think>reasoning</think> answer",
    "HTTPServerError getElementById snake_case_name CamelCase ALLCAPS",
    "a" * 300,
    " ",
    "",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Write `x = 1` in Python."},
    ],
]


def _pairs(ours: Tokenizer, theirs: object) -> None:
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(
            text, add_special_tokens=False
        ), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = builtin_model_path(DEFAULT_MODEL)
    assert path is not None
    return path


def _with_digit_split(theirs: object) -> object:
    """transformers' tokenizer with the split SmolLM2's own tokenizer.json and
    llama.cpp's ``smollm`` pre-tokenizer put first: every numeric character alone."""
    fixed = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(theirs.backend_tokenizer.to_str())
    )
    backend = fixed.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
    )
    return fixed


def test_builtin_file_matches_transformers(smollm2: Path) -> None:
    """Equal to transformers' GGUF tokenizer but for one thing it leaves out:
    ``smollm`` splits numeric characters off first. Only text with a non-ASCII one
    (such as "½" after a space, which has a merge) tokenizes differently."""
    ours = load_tokenizer(DEFAULT_MODEL)
    assert ours is not None
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    _pairs(ours, _with_digit_split(theirs))
    differ = [t for t in CORPUS if ours.encode(t) != theirs.encode(t)]
    assert differ and all(any(c.isnumeric() and not c.isascii() for c in t) for t in differ)
    assert ours.convert_ids_to_tokens(ours.encode(" ½")) == ["Ġ", "Â½"]
    for text in CORPUS:  # decoding does not depend on the split
        ids = theirs.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(
            ids, skip_special_tokens=False
        )
    for messages in MESSAGES:
        for gen in (True, False):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
    # the special tokens the engine relies on
    assert ours.special_tokens["eos_token"] == theirs.eos_token == "<|im_end|>"
    assert ours.bos_token_id == theirs.bos_token_id and ours.pad_token_id == theirs.pad_token_id
    assert ours.eos_token_ids == {2}
    assert ours.vocab_size == len(theirs) == 49152


@pytest.fixture(scope="module", params=["qwen2", "llama-bpe"])
def variant(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory) -> tuple:
    """SmolLM2's vocabulary under another pre-tokenizer, BOS on, two user-defined
    tokens appended, ChatML plus a named template."""
    meta = read_header(smollm2).metadata
    spec = TokenizerSpec(
        [*meta["tokenizer.ggml.tokens"], "<think>", "</think>"],
        list(meta["tokenizer.ggml.merges"]),
        [*meta["tokenizer.ggml.token_type"], 4, 4],
        request.param, bos=1, eos=2, pad=2, add_bos=True, chat_template=CHATML,
    )  # fmt: skip
    path = write_tokenizer_gguf(tmp_path_factory.mktemp(request.param) / "t.gguf", spec)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tokenizer_from_gguf(path), theirs


def test_pre_tokenizer_variants_match_transformers(variant: tuple) -> None:
    ours, theirs = variant
    assert ours.encode("hi")[0] == 1  # add_bos_token
    assert ours.encode("<think>x</think>", add_special_tokens=False)[::2] == [49152, 49153]
    _pairs(ours, theirs)
    want = theirs.apply_chat_template(MESSAGES[1], tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES[1]) == want


def test_digits_follow_the_pre_tokenizer(tmp_path: Path) -> None:
    """Llama 3 groups digits in threes; Qwen2 and SmolLM split every digit, so
    digit merges never apply to them."""
    tok = tiny_tokenizer()
    tok.tokens += ["12", "123", "45"]
    tok.token_types += [1, 1, 1]
    tok.merges += ["1 2", "12 3", "4 5"]
    pieces = {}
    for pre in ("llama-bpe", "qwen2", "smollm"):
        tok.pre = pre
        ours = tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", tok))
        pieces[pre] = ours.convert_ids_to_tokens(ours.encode("12345", add_special_tokens=False))
    assert pieces["llama-bpe"] == ["123", "45"]
    assert pieces["qwen2"] == pieces["smollm"] == list("12345")


def test_special_ids_eot_and_named_templates(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(w, tiny_tokenizer("llama-bpe"))
    w.add_eot_token_id(259)
    w.add_string("tokenizer.chat_template.tool_use", "{{ 'tools' }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = tokenizer_from_gguf(path)
    assert tok.eos_token_ids == {261, 259}
    assert set(tok.chat_template_names) == {"default", "tool_use"}
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]) == "tools"
    assert tok.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    assert tok.decode(tok.encode("<|im_start|>Ġthe"), skip_special_tokens=True) == "Ġthe"


def test_sentencepiece_and_unknown_pre_tokenizers_are_refused(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "spm2.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"'llama' \(SentencePiece vocabulary\).*--tokenizer"):
        tokenizer_from_gguf(tmp_path / "spm2.gguf")
    odd = tiny_tokenizer()
    odd.pre = "chameleon"
    write_tokenizer_gguf(tmp_path / "odd.gguf", odd)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.ggml\.pre 'chameleon' is unsupported"):
        tokenizer_from_gguf(tmp_path / "odd.gguf")


def test_tokenizer_dir_overrides_the_gguf(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_tokenizer_gguf(tmp_path / "t.gguf", tiny_tokenizer())
    own = load_tokenizer(path)
    other = load_tokenizer(path, tiny_model_dir)
    assert own is not None and other is not None
    assert other.vocab_size == Tokenizer.from_dir(tiny_model_dir).vocab_size != own.vocab_size
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json not found"):
        load_tokenizer(path, tmp_path)
