"""Which decoder class implements which Hugging Face architecture name."""

from __future__ import annotations

from lmfleet.engine.models.config import SUPPORTED_ARCHITECTURES, ArchConfig
from lmfleet.engine.models.llama import LlamaForCausalLM
from lmfleet.errors import ModelLoadError

_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

if set(_MODELS) != set(SUPPORTED_ARCHITECTURES):  # pragma: no cover - a programming error
    raise RuntimeError("registry and config.SUPPORTED_ARCHITECTURES disagree")


def resolve(arch: ArchConfig) -> type[LlamaForCausalLM]:
    """The decoder class for ``arch``; its constructor takes ``(arch, max_positions)``."""
    try:
        return _MODELS[arch.architecture]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {arch.architecture} in {arch.source}; "
            f"supported: {', '.join(sorted(_MODELS))}"
        ) from None
