from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.engine.tokenizer_synthetic import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    write_synthetic_tokenizer,
)
from lmfleet.errors import ConfigError


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert write_synthetic_tokenizer(a) == write_synthetic_tokenizer(b)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    write_synthetic_tokenizer(c, seed=1)
    assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, 777, 4096])
def test_exact_vocab_size(tmp_path: Path, vocab_size: int) -> None:
    assert write_synthetic_tokenizer(tmp_path, vocab_size=vocab_size) == vocab_size
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == vocab_size
    assert tok.decode(list(range(vocab_size)), skip_special_tokens=False)


def test_too_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        write_synthetic_tokenizer(tmp_path, vocab_size=MIN_VOCAB_SIZE - 1)


def test_files(tmp_path: Path) -> None:
    n = write_synthetic_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert n == tok.vocab_size > 500  # training learns merges beyond the 256 bytes
    assert [tok.convert_ids_to_tokens([i])[0] for i in range(len(SPECIAL_TOKENS))] == list(
        SPECIAL_TOKENS
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and "chat_template" in config
    text = "Grüße, мир, 世界 🚀 def f(x): return x"
    assert tok.decode(tok.encode(text)) == text
    # multi-byte characters span several tokens somewhere in this text
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(text))
