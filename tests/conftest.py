from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU. Set before any test module
    # imports triton: it decides interpreted or compiled when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 'tiny' Llama with a real tokenizer, written once per session."""
    from lmfleet.engine.models.presets import create_model

    return create_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)
