"""GGUF files: finding one, reading its header, reading one tensor's bytes.

A model given as ``FILE.gguf``, as a directory holding one ``.gguf`` (and no
safetensors checkpoint), or as a built-in model name (see
:mod:`lmfleet.engine.models.builtin`) is a GGUF checkpoint; :func:`find_gguf` says
which file. The header (metadata key/values and the tensor table) is parsed once
per file and process: the config, the tokenizer and the weights all read the same
:class:`GGUFHeader`. The parser is a small one of lmfleet's own (the ``gguf``
package's ``GGUFReader``, which the tests check it against, takes seconds over a
50k-token vocabulary); the package provides the storage types and their block
sizes. No mapping of the file is kept; tensor bytes are read on demand with plain
file reads, one tensor at a time. Every problem raises :class:`~lmfleet.errors.ModelLoadError`
naming the file. This module knows nothing about models or tokenizers.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch

from lmfleet.engine.models.builtin import builtin_model_path
from lmfleet.errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
#: a directory with one of these is a safetensors checkpoint, even next to a .gguf
_SAFETENSORS_MARKERS = ("model.safetensors", "model.safetensors.index.json")
_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One entry of the tensor table. ``shape`` is in torch order (the GGUF
    dimensions reversed: rows first), ``offset`` the absolute file offset."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """A GGUF file's metadata (plain Python values: str, int, float, bool, lists)
    and tensor table (file order, and by name). Shared: treat as read-only."""

    path: Path
    metadata: Mapping[str, Any]
    tensors: tuple[GGUFTensor, ...]
    by_name: Mapping[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def num_bytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(t.nbytes for t in self.tensors)


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file that ``model`` names, or None when it is no GGUF checkpoint.

    ``model`` is a built-in model name, a ``.gguf`` file, or a directory holding
    exactly one ``.gguf`` and no safetensors checkpoint. A directory with several is
    an error that lists them (pass the file instead); so is a missing built-in."""
    path = Path(model)
    if not path.exists():
        builtin = builtin_model_path(str(model))
        if builtin is not None:
            return builtin
        if path.suffix == GGUF_SUFFIX:
            raise ModelLoadError(f"{path}: GGUF file not found")
        return None
    if path.is_file():
        return path if path.suffix == GGUF_SUFFIX or is_gguf_file(path) else None
    if any((path / marker).is_file() for marker in _SAFETENSORS_MARKERS):
        return None
    found = sorted(p for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(
            f"{path}: holds {len(found)} GGUF files ({names}); pass the one to load, "
            f"e.g. {found[0]}"
        )
    return found[0] if found else None


def read_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file at ``path``, parsed once per process and file
    version (path, size and modification time)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {exc}") from exc
    return _read_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_header(path: Path, size: int, mtime_ns: int) -> GGUFHeader:
    del size, mtime_ns  # part of the cache key only
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            parser = _HeaderParser(mm, path)
            metadata, tensors = parser.parse()
            del parser  # no view of the mapping may outlive it
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {exc}") from exc
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path}: not a readable GGUF file: truncated or corrupt ({exc})"
        ) from exc
    return GGUFHeader(
        path, MappingProxyType(metadata), tensors, MappingProxyType({t.name: t for t in tensors})
    )


#: GGUF value type -> struct format of a scalar (little-endian); 8 = string, 9 = array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _HeaderParser:
    """The GGUF header (version 2 or 3, little-endian): magic, version, tensor and
    key/value counts, the key/values, the tensor infos, then tensor data at the next
    multiple of ``general.alignment``. A string is a u64 length and UTF-8 bytes; an
    array a u32 element type, a u64 count and the elements. The ``gguf`` package's
    ``GGUFReader`` reads the same (the tests compare the two); this one exists
    because that one takes seconds over a 50k-token vocabulary."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("Q")
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise IndexError("string runs past the end of the file")
        return self.buf[start : self.pos].decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        etype, count = self._scalar("I"), self._scalar("Q")
        if etype in _SCALARS:  # numbers in one go
            fmt = _SCALARS[etype]
            width = struct.calcsize(fmt)
            values = list(struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos))
            self.pos += width * count
            return values
        return [self._value(etype) for _ in range(count)]

    def parse(self) -> tuple[dict[str, Any], tuple[GGUFTensor, ...]]:
        if self.buf[:4] != _MAGIC:
            raise ValueError("no GGUF magic at the start of the file")
        self.pos = 4
        version = self._scalar("I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"GGUF version {version} is unsupported{hint}; versions 2 and 3 are")
        num_tensors, num_kv = self._scalar("Q"), self._scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            metadata[key] = self._value(self._scalar("I"))
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            dims = [self._scalar("Q") for _ in range(self._scalar("I"))]
            infos.append((name, dims, self._scalar("I"), self._scalar("Q")))
        align = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment must be a power of two, got {align!r}")
        data_start = -(-self.pos // align) * align
        from gguf import GGML_QUANT_SIZES  # (values, bytes) per block, by storage type

        sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
        return metadata, tuple(self._tensor(data_start, sizes, *info) for info in infos)

    def _tensor(
        self,
        data_start: int,
        sizes: dict[int, tuple[int, int]],
        name: str,
        dims: list[int],
        qtype: int,
        offset: int,
    ) -> GGUFTensor:
        try:
            block, size = sizes[qtype]
        except KeyError:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has GGML type {qtype}, unknown to the gguf package"
            ) from None
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * size
        start = data_start + offset
        if start + nbytes > len(self.buf):
            raise ModelLoadError(f"{self.path}: tensor {name} runs past the end of the file")
        return GGUFTensor(name, qtype, tuple(reversed(dims)), start, nbytes)


def read_tensor_bytes(f: BinaryIO, tensor: GGUFTensor, path: Path) -> torch.Tensor:
    """The stored bytes of ``tensor`` as a new 1-D uint8 CPU tensor, from ``f`` (the
    file at ``path``, opened in binary mode)."""
    buf = torch.empty(tensor.nbytes, dtype=torch.uint8)
    f.seek(tensor.offset)
    read = f.readinto(memoryview(buf.numpy()))
    if read != tensor.nbytes:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} is truncated ({read} of {tensor.nbytes} bytes)"
        )
    return buf
