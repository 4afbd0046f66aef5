"""A small, real tokenizer built offline, for tests and benchmarks.

:func:`write_synthetic_tokenizer` trains a byte-level BPE tokenizer (the ``tokenizers``
library, no download) on a built-in multilingual corpus and writes the files a model
directory carries: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, a
ChatML-style chat template) and ``generation_config.json`` (eos ids). It knows nothing
about models; a model built for the same directory sizes its embedding to the returned
vocabulary size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmfleet.errors import ConfigError

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END, PAD)

#: the vocabulary training aims for when the caller does not ask for a size
_DEFAULT_TRAIN_VOCAB = 2048
#: 256 byte symbols plus the special tokens: the smallest byte-level vocabulary
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PROSE = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a
small lamp, a notebook, and a thermos of strong black tea. From the gallery at the top
he could see the whole bay: the fishing boats coming home, the gulls circling above the
harbour wall, and the long grey line of the horizon where the weather was born.

In the morning the market opened early. Farmers arrived with crates of apples, pears,
carrots and onions; the baker sold warm bread and honey cakes; children ran between the
stalls while their parents argued about the price of cheese. Nobody was in a hurry, and
everybody had an opinion about the rain.

Engineers like to say that a system is only as reliable as its weakest component. A
server that answers requests quickly but crashes once a day is worse than one that is
slightly slower and never fails. Measure first, then optimize; keep the queue short,
the batches full, and the latency predictable. When in doubt, write a test.

She opened the old book and read the first line aloud: "It was a quiet winter, and the
river froze from bank to bank." The students listened, some taking notes, others gazing
out of the window at the snow. Questions followed: Why did the author choose winter?
What does the frozen river mean? Is silence a kind of answer?

Numbers appear everywhere: 3 apples, 12 eggs, 1024 bytes, 3.14159, 2.71828, 100%,
$19.99, 7:45 pm, 2024-05-17, +1 (555) 010-0199. Lists, too: first, second, third;
alpha, beta, gamma, delta. Punctuation matters -- commas, semicolons; colons: dashes.
"""

_MULTILINGUAL = """\
Le café était fermé, alors nous sommes allés au marché près de la rivière. Où est la
bibliothèque? Très bien, merci beaucoup! Ça va, à bientôt.
Der Bäcker öffnet früh; die Straße ist ruhig und die Brötchen sind frisch. Schön!
El niño comió una manzana y la señora leyó el periódico en el jardín. ¿Qué hora es?
Ação, coração, informação: palavras portuguesas com acentos e cedilha. Olá, tudo bem?
Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy. Ærø, Øresund, Ålborg.
Привет, как дела? Сегодня хорошая погода, и мы идём гулять в парк у реки.
Москва, Санкт-Петербург, Новосибирск. Спасибо большое, до свидания!
Καλημέρα κόσμε. Η θάλασσα είναι ήρεμη σήμερα.
你好，世界！今天天气很好，我们去公园散步吧。学习中文需要耐心和时间。
東京は日本の首都です。ありがとうございます。こんにちは、元気ですか？
안녕하세요, 만나서 반갑습니다. 오늘은 날씨가 좋네요.
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก
Emoji: 😀 😂 🎉 🚀 ❤️ 👍🏽 🇫🇷 🧑‍💻 🌍 ✨ — and symbols: € £ ¥ © ® ™ ∑ ∞ √ ≠ ≤ ≥ → ←
"""

_CODE = """\
def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class Queue:
    def __init__(self, capacity: int = 16) -> None:
        self.items: list[str] = []
        self.capacity = capacity

    def push(self, item: str) -> bool:
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        return True

if __name__ == "__main__":
    print(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]

{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }
SELECT id, name FROM users WHERE age >= 18 ORDER BY name;
<div class="note"><p>Hello &amp; welcome</p></div>
$ curl -s http://localhost:8000/v1/models | jq '.data[0].id'
"""


def _corpus(seed: int) -> list[str]:
    """Corpus lines: the seed leaves out about one in eight prose and code lines, which
    changes pair frequencies and so the merges. The multilingual lines always stay."""
    rng = random.Random(seed)
    kept = [line for line in (_PROSE + _CODE).splitlines() if rng.random() >= 0.125]
    return kept + _MULTILINGUAL.splitlines()


def _train(target_vocab: int, seed: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target_vocab,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-3 style: the post-processor puts BOS in front of every encoded text
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _pad_vocab(tok: HFTokenizer, vocab_size: int) -> None:
    """Add plain (non-special) tokens until the vocabulary has exactly ``vocab_size`` ids."""
    have = tok.get_vocab_size(with_added_tokens=True)
    extra = [
        AddedToken(f"<|extra_{i}|>", special=False, normalized=False)
        for i in range(vocab_size - have)
    ]
    if extra:
        tok.add_tokens(extra)


def _tokenizer_config() -> dict[str, object]:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_synthetic_tokenizer(
    out_dir: str | Path, *, vocab_size: int | None = None, seed: int = 0
) -> int:
    """Train the tokenizer and write its files into ``out_dir``; return its vocabulary size.

    With ``vocab_size`` the vocabulary has exactly that many ids: training stops there,
    or plain ``<|extra_N|>`` tokens fill the rest, so every id a model of that size can
    sample decodes to text. The same arguments always give the same files.
    """
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size: must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    target = vocab_size if vocab_size is not None else _DEFAULT_TRAIN_VOCAB
    tok = _train(min(target, _DEFAULT_TRAIN_VOCAB), seed)
    if vocab_size is not None:
        _pad_vocab(tok, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(IM_END)]
    files = {
        "tokenizer_config.json": _tokenizer_config(),
        "generation_config.json": {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": eos_ids},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)
