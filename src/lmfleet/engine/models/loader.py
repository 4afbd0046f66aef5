"""Load a Hugging Face safetensors checkpoint into a decoder (GGUF files go to
:mod:`lmfleet.engine.models.gguf_loader`).

The module is built on the ``meta`` device (no memory), then each tensor is read
from its file on its own, converted to the target dtype and device, and assigned
as the parameter, so at most one tensor exists twice at any time. Every problem
with the files raises :class:`~lmfleet.errors.ModelLoadError` naming the file (and
the tensor). Scalar fp8 KV-cache scales that quantized checkpoints carry
(``self_attn.k_scale`` and the like, see :mod:`lmfleet.engine.kv_scales`) are read
into :attr:`LoadedModel.kv_scales`; what to do with them is the runner's business.
Checkpoints that store projections in fp8 (see :mod:`lmfleet.engine.models.quant_config`)
have those modules swapped for empty :class:`~lmfleet.engine.layers.quant.Fp8Linear`
layers before reading, which the fp8 weights and scales then fill as stored.
This module knows nothing else about the KV cache or the engine.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from lmfleet.engine.kv_scales import KVScales, checkpoint_kv_scales, kv_scale_tensor_layer
from lmfleet.engine.models.config import ArchConfig
from lmfleet.engine.models.fp8_weights import Fp8Tensor, check_shape, install_fp8_layers
from lmfleet.engine.models.llama import LlamaForCausalLM
from lmfleet.engine.models.quant_config import WEIGHT_SCALE
from lmfleet.engine.models.registry import resolve
from lmfleet.errors import ModelLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: checkpoint tensors that older exports carry and the decoders recompute
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run. ``num_bytes`` counts the tensor data read from the
    checkpoint (in its stored dtype); ``bytes_per_second`` is that over ``load_seconds``."""

    model: LlamaForCausalLM
    arch: ArchConfig
    num_bytes: int
    load_seconds: float
    bytes_per_second: float
    #: the checkpoint's fp8 KV-cache scales, None when it has none
    kv_scales: KVScales | None = None
    #: how many projections hold the checkpoint's own fp8 weights (in ``Fp8Linear``)
    num_quantized: int = 0

    @property
    def quantization(self) -> str | None:
        """``"fp8"`` when the checkpoint's own fp8 weights were loaded as such."""
        return "fp8" if self.num_quantized else None


def checkpoint_files(model_dir: Path) -> tuple[list[Path], Path, dict[str, str] | None]:
    """The safetensors files of ``model_dir``, the file that lists them (for error
    messages), and the index's tensor → file map when the checkpoint is sharded."""
    index_path = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index: {exc!r}") from exc
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (model_dir / name).is_file():
                raise ModelLoadError(f"{model_dir / name}: shard listed in {index_path} not found")
        return [model_dir / name for name in names], index_path, weight_map
    if single.is_file():
        return [single], single, None
    raise ModelLoadError(f"{single}: not found (nor {INDEX_FILE}) in {model_dir}")


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool = True,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Build the decoder of ``model_dir`` and load its weights as ``dtype`` on ``device``.

    ``max_model_len`` (default: the checkpoint's ``max_position_embeddings``) sizes
    the rotary tables and is checked against a configured sliding window.
    """
    from lmfleet.engine.models.gguf_file import find_gguf

    gguf = find_gguf(model_dir)
    if gguf is not None:  # a .gguf file, a directory holding one, a built-in name
        from lmfleet.engine.models.gguf_loader import load_gguf_model

        return load_gguf_model(
            gguf, dtype=dtype, device=device, progress=progress, max_model_len=max_model_len
        )
    model_dir = Path(model_dir)
    device = torch.device(device)
    start = time.perf_counter()
    arch = ArchConfig.from_dir(model_dir)
    max_len = max_model_len or arch.max_position_embeddings
    arch.check_max_model_len(max_len)
    files, listing, weight_map = checkpoint_files(model_dir)

    with torch.device("meta"):
        model = resolve(arch)(arch, max_positions=max_len)
    fp8: dict[str, Fp8Tensor] = {}
    if arch.quantization is not None:
        fp8 = install_fp8_layers(model, arch.quantization, files, listing)
    params = dict(model.named_parameters(remove_duplicate=False))

    total = sum(path.stat().st_size for path in files)
    num_bytes = 0
    loaded: dict[str, Path] = {}
    kv_scale_values: dict[tuple[int, str], float] = {}
    with weights_progress(total, progress) as bar:
        for path in files:
            file_bytes = 0
            for name, tensor in _read_file(path, params, fp8):
                if name in loaded:
                    raise ModelLoadError(f"{path}: tensor {name} also stored in {loaded[name]}")
                if weight_map is not None and weight_map.get(name, path.name) != path.name:
                    raise ModelLoadError(
                        f"{path}: tensor {name} is listed in {listing} under {weight_map[name]}"
                    )
                file_bytes += tensor.nbytes
                if name in fp8:  # before params: a block-wise fp8 weight is one too
                    fp8[name].assign(path, name, tensor, dtype, device)
                elif name in params:
                    assign_parameter(model, name, _convert(tensor, dtype, device))
                else:  # _read_file yields parameters, fp8 tensors and KV scales only
                    scale_of = kv_scale_tensor_layer(name)
                    assert scale_of is not None
                    kv_scale_values[scale_of] = _scalar(path, name, tensor)
                loaded[name] = path
                bar.update(tensor.nbytes)
            num_bytes += file_bytes
            bar.update(path.stat().st_size - file_bytes)  # header and padding

    tied = arch.tie_word_embeddings and "lm_head.weight" not in loaded
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if weight_map is not None:
        absent = [n for n in weight_map if n not in loaded and not n.endswith(_IGNORED_SUFFIXES)]
        if absent:
            raise ModelLoadError(
                f"{model_dir / weight_map[absent[0]]}: tensor {absent[0]} listed in {listing} "
                "is not in the file"
            )
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    missing += [n for n, slot in fp8.items() if slot.required and n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{listing}: missing tensor {missing[0]}{more}")

    kv_scales = None
    if kv_scale_values:
        try:
            kv_scales = checkpoint_kv_scales(kv_scale_values, arch.num_hidden_layers)
        except ValueError as exc:
            raise ModelLoadError(f"{listing}: {exc}") from exc
    model.init_buffers(device)
    model.eval()
    num_fp8 = sum(slot.kind == "weight" for slot in fp8.values())  # kept in fp8
    num_block = sum(slot.kind == "block_weight" for slot in fp8.values())  # dequantized
    if arch.quantization is not None:
        q = arch.quantization
        dropped = sum(slot.kind == "input_scale" and n in loaded for n, slot in fp8.items())
        if num_block:
            logger.info(
                "%d projections stored as block-wise fp8 (%dx%d tiles) dequantized to %s: "
                "there is no block-wise fp8 GEMM here (--quantization fp8 requantizes "
                "them per channel)",
                num_block,
                *(q.block or (0, 0)),
                str(dtype).removeprefix("torch."),
            )
        else:
            logger.info(
                "%d projections hold the checkpoint's fp8 weights (%s, per-%s scales)",
                num_fp8,
                q.method,
                q.strategy,
            )
        if dropped:
            logger.info(
                "%d static input scales dropped: activations are quantized per token", dropped
            )
    seconds = time.perf_counter() - start
    rate = num_bytes / seconds if seconds > 0 else float("inf")
    logger.info(
        "loaded %s (%s) from %s: %.1f MB in %.2fs, %.1f MB/s",
        arch.architecture,
        str(dtype).removeprefix("torch."),
        model_dir,
        num_bytes / 1e6,
        seconds,
        rate / 1e6,
    )
    return LoadedModel(model, arch, num_bytes, seconds, rate, kv_scales, num_fp8)


def _read_file(
    path: Path, params: dict[str, nn.Parameter], fp8: dict[str, Fp8Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of ``path`` one at a time, after checking the name
    and shape against the model's parameters; fp8 projection tensors (checked when
    assigned) and KV-scale tensors (not parameters) are yielded as they are."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in fp8:
                    yield name, f.get_tensor(name)
                    continue
                if name not in params:
                    if kv_scale_tensor_layer(name) is not None:
                        yield name, f.get_tensor(name)  # a KV scale: load_model reads it
                        continue
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    raise ModelLoadError(f"{path}: unexpected tensor {name} (not in the model)")
                shape = tuple(f.get_slice(name).get_shape())
                check_shape(path, name, shape, tuple(params[name].shape))
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point():
                    raise ModelLoadError(
                        f"{path}: tensor {name} has dtype {tensor.dtype}, not a float"
                    )
                if tensor.element_size() == 1:  # float8 without a weight_scale to undo it
                    raise ModelLoadError(
                        f"{path}: tensor {name} is {tensor.dtype} but has no "
                        f"{WEIGHT_SCALE}, or config.json declares no quantization_config"
                    )
                yield name, tensor
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors: {exc}") from exc


def _scalar(path: Path, name: str, tensor: torch.Tensor) -> float:
    """The value of a one-element float scale tensor (any shape, e.g. () or (1,))."""
    if tensor.numel() != 1 or not tensor.is_floating_point():
        raise ModelLoadError(
            f"{path}: tensor {name} must hold one float (a per-tensor KV scale), got "
            f"shape {list(tensor.shape)} {tensor.dtype}"
        )
    return float(tensor.float().item())


def _convert(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` in ``dtype`` on ``device`` (no copy when it already is)."""
    return tensor.to(device=device, dtype=dtype)


def weights_progress(total_bytes: int, progress: bool) -> tqdm:
    """The loaders' progress bar: bytes of weights read, on stderr."""
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="loading weights",
        file=sys.stderr,
        disable=not progress,
    )


def assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in as the (frozen) parameter ``name`` of a model built on meta."""
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))
