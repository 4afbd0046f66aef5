"""The simulator's tokenizer stand-in: a real word-level tokenizer over a synthetic
vocabulary, written in the Hugging Face layout so the whole stack (chat template,
detokenizer, OpenAI API) runs unchanged. One word of the vocabulary is one token;
words outside it map to ``<|unk|>``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

SPECIAL_TOKENS = ("<|unk|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
#: generated tokens are drawn from ids at or above this
FIRST_WORD_ID = len(SPECIAL_TOKENS)
_ROLE_WORDS = ("system", "user", "assistant", "tool")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def synthetic_words(n: int) -> list[str]:
    """``n`` distinct pronounceable words, shortest first, always the same."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: list[str] = list(_ROLE_WORDS)
    for length in itertools.count(1):
        for combo in itertools.product(syllables, repeat=length):
            if len(words) >= n:
                return words[:n]
            words.append("".join(combo))
    return words  # unreachable


def write_sim_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Write the tokenizer files once; later calls find them in place."""
    out = Path(out_dir)
    marker = out / "sim_tokenizer.json"
    want = {"vocab_size": vocab_size, "format": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, word in enumerate(synthetic_words(vocab_size - len(SPECIAL_TOKENS))):
        vocab[word] = FIRST_WORD_ID + i
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "unk_token": "<|unk|>",
        "pad_token": "<|end_of_text|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": [EOS_ID, IM_END_ID], "bos_token_id": BOS_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    marker.write_text(json.dumps(want) + "\n")  # last: a partial write is redone
    return out
