"""Dequantization of every supported GGML type against the ``gguf`` package's own
numpy reference, on tensors written to a file by its ``GGUFWriter`` and read back
through lmfleet's header and byte reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from lmfleet.engine.models.gguf_file import read_header, read_tensor_bytes
from lmfleet.engine.models.gguf_quants import FORMATS, dequantize
from tests.engine.models.gguf_writer import K_QUANTS, QUANTIZABLE, encode

SUPPORTED = [Q(t) for t in FORMATS]
# rows x columns: several 256-value super-blocks per row, an odd number of rows
SHAPE = (7, 768)


def test_every_listed_type_is_covered() -> None:
    assert set(SUPPORTED) == set(QUANTIZABLE) | set(K_QUANTS)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """One file holding a SHAPE tensor of every supported type (plus a 1-D one), and
    each tensor's reference dequantization computed from the stored bytes."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    stored: dict[str, tuple[np.ndarray, Q]] = {}
    for qtype in SUPPORTED:
        values = rng.normal(0, 1.0, size=SHAPE).astype(np.float32)
        stored[qtype.name] = (encode(values, qtype, rng), qtype)
    stored["vector"] = (rng.normal(size=96).astype(np.float32), Q.F32)
    for name, (data, qtype) in stored.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = {name: quants.dequantize(data, qtype) for name, (data, qtype) in stored.items()}
    return path, reference


def _ours(path: Path, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    header = read_header(path)
    t = header.by_name[name]
    with path.open("rb") as f:
        raw = read_tensor_bytes(f, t, path)
    return dequantize(raw, t.qtype, t.shape, dtype)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_float32_equals_the_reference_exactly(written: tuple, qtype: Q) -> None:
    path, reference = written
    header = read_header(path)
    assert header.by_name[qtype.name].qtype == qtype
    assert header.by_name[qtype.name].shape == SHAPE
    got = _ours(path, qtype.name)
    want = torch.from_numpy(reference[qtype.name].astype(np.float32))
    assert got.shape == want.shape == SHAPE
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.BF16, Q.F16], ids=lambda q: q.name)
def test_half_types_are_the_reference_rounded_once(
    written: tuple, qtype: Q, dtype: torch.dtype
) -> None:
    path, reference = written
    got = _ours(path, qtype.name, dtype)
    assert got.dtype == dtype
    want = torch.from_numpy(reference[qtype.name].astype(np.float32)).to(dtype)
    assert torch.equal(got, want)


def test_one_dimensional_tensor(written: tuple) -> None:
    path, reference = written
    assert read_header(path).by_name["vector"].shape == (96,)
    assert torch.equal(_ours(path, "vector"), torch.from_numpy(reference["vector"]))


def test_chunks_cover_many_blocks(monkeypatch: pytest.MonkeyPatch, written: tuple) -> None:
    """A tensor decoded in several chunks (and a ragged last one) is the same."""
    import lmfleet.engine.models.gguf_quants as gq

    path, reference = written
    monkeypatch.setattr(gq, "_CHUNK_BLOCKS", 5)
    for qtype in (Q.Q5_1, Q.Q6_K):
        want = torch.from_numpy(reference[qtype.name].astype(np.float32))
        assert torch.equal(_ours(path, qtype.name), want)


def test_wrong_byte_count_and_unsupported_type_raise() -> None:
    with pytest.raises(ValueError, match=r"Q8_0 tensor of shape \[2, 32\] needs 68 bytes"):
        dequantize(torch.zeros(60, dtype=torch.uint8), Q.Q8_0, (2, 32), torch.float32)
    with pytest.raises(ValueError, match="blocks of 256"):
        dequantize(torch.zeros(84, dtype=torch.uint8), Q.Q2_K, (2, 128), torch.float32)
    with pytest.raises(ValueError, match="IQ2_XXS is unsupported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,), torch.float32)
