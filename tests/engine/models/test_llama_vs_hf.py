"""Our decoders against Hugging Face transformers, logit for logit, in float32.

Each case builds a tiny random HF model, saves it with ``save_pretrained``, loads
it through :func:`load_model`, and runs prompts through the paged KV cache: as one
prefill, as chunks followed by decode steps, and as a mixed batch of sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmfleet.engine.models.loader import load_model
from lmfleet.errors import ModelLoadError
from tests.engine.layers.paged_kv import BlockLayout, positions_for

transformers = pytest.importorskip("transformers")

VOCAB = 128
ATOL = 1e-4

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def _llama(**kw: object) -> object:
    return transformers.LlamaConfig(**{**_COMMON, **kw})


CASES: dict[str, Callable[[], object]] = {
    "llama": lambda: _llama(),
    "llama-mha": lambda: _llama(num_key_value_heads=4),
    "llama-tied": lambda: _llama(tie_word_embeddings=True),
    "llama3-rope": lambda: _llama(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen2-tied": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=32),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=None),
}


def _save_hf(config: object, out: Path, seed: int = 0) -> torch.nn.Module:
    """A random HF model (every parameter perturbed, biases and norms included),
    saved to ``out`` as safetensors."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(out)
    return model


@pytest.fixture(params=[(case, fused) for case in CASES for fused in (False, True)])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[torch.nn.Module, object]:
    """HF's model and ours, the latter with fused q/k/v and gate/up projections in the
    ``fused`` cases (what the engine's runner runs)."""
    case, fused = request.param
    hf = _save_hf(CASES[case](), tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False)
    if fused:
        ours.model.fuse_projections()
        names = {name for name, _ in ours.model.named_parameters()}
        assert "model.layers.0.self_attn.qkv_proj.weight" in names
        assert "model.layers.0.mlp.gate_up_proj.weight" in names
        assert not any(".q_proj." in n or ".up_proj." in n for n in names)
    return hf, ours


def _hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()  # (L, vocab)


class _Paged:
    """A minimal runner: a KV cache, a block layout, and one ``step`` call."""

    def __init__(self, loaded: object, block_size: int, num_blocks: int = 40) -> None:
        self.model = loaded.model
        arch = loaded.arch
        self.layout = BlockLayout(num_blocks, block_size, seed=block_size)
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.caches = [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]

    def step(self, steps: list[tuple[int, int, int]], ids: torch.Tensor) -> torch.Tensor:
        meta = self.layout.metadata(steps)
        with torch.no_grad():
            hidden = self.model(ids, positions_for(steps), self.caches, meta)
            return self.model.compute_logits(hidden)


@pytest.mark.parametrize("block_size", [4, 16])
def test_whole_prefill(pair: tuple, block_size: int) -> None:
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(1))
    got = _Paged(ours, block_size).step([(0, 21, 21)], ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=ATOL)


def test_chunked_prefill_then_decode(pair: tuple) -> None:
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(2))
    runner = _Paged(ours, block_size=4)
    outs, done = [], 0
    for n in (8, 7, 5, 1, 1, 1):
        outs.append(runner.step([(0, n, done + n)], ids[done : done + n]))
        done += n
    torch.testing.assert_close(torch.cat(outs), _hf_logits(hf, ids), atol=ATOL, rtol=ATOL)


def test_mixed_batch(pair: tuple) -> None:
    """Three sequences at different stages share every step: whole prefills,
    chunks over cached context, and decodes (batched once two of them decode)."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (13, 22, 9)]
    runner = _Paged(ours, block_size=4)
    # per step: (seq, new tokens) ; a sequence's context grows by its new tokens
    schedule = [
        [(0, 10), (1, 8)],
        [(0, 1), (1, 12), (2, 5)],
        [(0, 1), (1, 1), (2, 4)],
        [(0, 1), (1, 1)],
    ]
    done = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    for entries in schedule:
        steps = [(s, n, done[s] + n) for s, n in entries]
        ids = torch.cat([prompts[s][done[s] : done[s] + n] for s, n in entries])
        logits = runner.step(steps, ids)
        offset = 0
        for s, n in entries:
            got[s].append(logits[offset : offset + n])
            offset += n
            done[s] += n
    assert done == [13, 22, 9]
    for s, prompt in enumerate(prompts):
        torch.testing.assert_close(torch.cat(got[s]), _hf_logits(hf, prompt), atol=ATOL, rtol=ATOL)


def test_tied_embeddings_share_storage(tmp_path: Path) -> None:
    _save_hf(CASES["llama-tied"](), tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_mistral_sliding_window_is_rejected_unless_max_len_fits(tmp_path: Path) -> None:
    config = transformers.MistralConfig(
        **{**_COMMON, "max_position_embeddings": 64}, sliding_window=32
    )
    _save_hf(config, tmp_path)
    with pytest.raises(ModelLoadError, match=r"config\.json: sliding_window=32"):
        load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False)
    load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False, max_model_len=32)
