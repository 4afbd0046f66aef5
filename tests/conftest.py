from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 'tiny' Llama with a real tokenizer, written once per session."""
    from lmfleet.engine.models.presets import create_model

    return create_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)
