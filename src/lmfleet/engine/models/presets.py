"""Named shapes of random-weight models that lmfleet can write to disk itself.

No weights can be downloaded where lmfleet is tested, so the CLI, tests and
benchmarks create checkpoints in the Hugging Face layout (config.json, safetensors,
tokenizer files) with random weights and a fixed seed, and load them through the
real loading code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmfleet.engine.models.synthetic import write_random_checkpoint
from lmfleet.engine.tokenizer import Tokenizer
from lmfleet.engine.tokenizer_synthetic import write_synthetic_tokenizer
from lmfleet.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Preset:
    description: str
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    #: None: as large as the trained tokenizer; else the tokenizer is padded to it
    vocab_size: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "a 2-layer Llama (~1M parameters) for demos and tests; loads in milliseconds",
        "LlamaForCausalLM",
        128,
        352,
        2,
        4,
        2,
    ),
    "llama-50m": Preset(
        "the engine benchmark's ~50M-parameter Llama (hidden 512, 8 layers, 8 heads, "
        "4 KV heads, vocab 32000)",
        "LlamaForCausalLM",
        512,
        1408,
        8,
        8,
        4,
        vocab_size=32000,
    ),
    "qwen3-0.6b": Preset(
        "the shape of Qwen3-0.6B (596M parameters, bf16) for GPU benchmarks",
        "Qwen3ForCausalLM",
        1024,
        3072,
        28,
        16,
        8,
        vocab_size=151936,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        dtype="bfloat16",
        extra={"rope_theta": 1000000.0},
    ),
}


def create_model(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0) -> Path:
    """Write tokenizer files and random weights of a named preset to ``out_dir``."""
    if preset not in PRESETS:
        raise ConfigError(
            f"preset: unknown model preset {preset!r}; choose one of {sorted(PRESETS)}"
        )
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_synthetic_tokenizer(out, vocab_size=p.vocab_size, seed=seed)
    tok = Tokenizer.from_dir(out)
    extra = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, **p.extra}
    write_random_checkpoint(
        out,
        p.arch,
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
        num_kv_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings,
        dtype=p.dtype,
        seed=seed,
        extra_config=extra,
    )
    (out / "lmfleet_preset.json").write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    logger.info("wrote random %s model (%s) to %s", preset, p.description, out)
    return out


def ensure_model(out_dir: str | Path, preset: str = "tiny", *, seed: int = 0) -> Path:
    """``create_model`` unless ``out_dir`` already holds that preset and seed."""
    out = Path(out_dir)
    marker = out / "lmfleet_preset.json"
    if marker.exists() and json.loads(marker.read_text()) == {"preset": preset, "seed": seed}:
        return out
    return create_model(out, preset, seed=seed)
