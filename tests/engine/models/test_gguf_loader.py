"""GGUF checkpoints written by the tests (random weights, ``GGUFWriter``) load into
the decoder and give transformers' logits; bad files fail with errors that name the
file, the tensor and the type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmfleet.engine.models.builtin import DEFAULT_MODEL
from lmfleet.engine.models.config import ArchConfig
from lmfleet.engine.models.gguf_file import find_gguf, read_header
from lmfleet.engine.models.gguf_loader import hf_name, unpermute_qk
from lmfleet.engine.models.loader import load_model
from lmfleet.errors import ModelLoadError
from tests.engine.layers.paged_kv import BlockLayout, positions_for
from tests.engine.models.gguf_writer import (
    TINY_VOCAB,
    ModelSpec,
    llama_cpp_permute,
    tiny_tokenizer,
    write_model_gguf,
)

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
#: files transformers' own GGUF loading reads too (same storage types and shapes)
HF_CASES = {
    "qwen2-bias-q8_0": ModelSpec("qwen2", qkv_bias=True, matrix_type=Q.Q8_0),
    # transformers' GGUF Qwen3 takes head_dim 128 whatever the file says: 512 / 4 heads
    "qwen3-qknorm-tied-q4_1": ModelSpec(
        "qwen3", hidden=512, ffn=128, heads=4, qk_norm=True, tied=True, matrix_type=Q.Q4_1
    ),
    "llama-f16-permuted": ModelSpec("llama", matrix_type=Q.F16, types={"output.weight": Q.Q5_0}),
    "llama-mha-q5_1": ModelSpec("llama", kv_heads=4, matrix_type=Q.Q5_1, tied=True),
}


def _write(tmp: Path, spec: ModelSpec) -> Path:
    spec.tokenizer = spec.tokenizer or tiny_tokenizer()
    path = tmp / "model.gguf"
    write_model_gguf(path, spec)
    return path


@pytest.fixture(scope="module", params=list(HF_CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """transformers' model of a file (its own GGUF loading) and ours."""
    tmp = tmp_path_factory.mktemp(request.param)
    path = _write(tmp, HF_CASES[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    return hf, ours


def _hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()  # (L, vocab)


class _Paged:
    def __init__(self, loaded: object, block_size: int = 4, num_blocks: int = 40) -> None:
        self.model = loaded.model
        arch = loaded.arch
        self.layout = BlockLayout(num_blocks, block_size, seed=block_size)
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.caches = [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]

    def step(self, steps: list[tuple[int, int, int]], ids: torch.Tensor) -> torch.Tensor:
        meta = self.layout.metadata(steps)
        with torch.no_grad():
            return self.model.compute_logits(
                self.model(ids, positions_for(steps), self.caches, meta)
            )


def test_weights_equal_transformers_gguf_loading(pair: tuple) -> None:
    hf, ours = pair
    theirs, mine = hf.state_dict(), ours.model.state_dict()
    assert set(theirs) == set(mine)
    for name, value in theirs.items():
        assert torch.equal(value, mine[name]), name


def test_whole_prefill_matches_transformers(pair: tuple) -> None:
    hf, ours = pair
    ids = torch.randint(0, TINY_VOCAB, (21,), generator=torch.Generator().manual_seed(1))
    got = _Paged(ours).step([(0, 21, 21)], ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=ATOL)


def test_chunked_prefill_then_decode_matches_transformers(pair: tuple) -> None:
    hf, ours = pair
    ids = torch.randint(0, TINY_VOCAB, (23,), generator=torch.Generator().manual_seed(2))
    runner = _Paged(ours)
    outs, done = [], 0
    for n in (8, 7, 5, 1, 1, 1):
        outs.append(runner.step([(0, n, done + n)], ids[done : done + n]))
        done += n
    torch.testing.assert_close(torch.cat(outs), _hf_logits(hf, ids), atol=ATOL, rtol=ATOL)


def test_qwen3_head_dim_and_k_quants_match_a_reference_model(tmp_path: Path) -> None:
    """Qwen3 with head_dim (32) != hidden / heads (64) read from attention.key_length,
    and K-quant matrices (which need 256-wide rows): transformers' GGUF loading
    reads neither key_length nor builds such a model, so the reference is a
    transformers Qwen3 from its config with weights dequantized by ``gguf``."""
    types = {"blk.0.attn_q.weight": Q.Q2_K, "blk.0.attn_k.weight": Q.Q3_K}
    types |= {"blk.0.ffn_up.weight": Q.Q5_K, "blk.1.ffn_gate.weight": Q.Q6_K}
    spec = ModelSpec(
        "qwen3", hidden=256, ffn=512, heads=8, kv_heads=2, head_dim=32, qk_norm=True,
        matrix_type=Q.Q4_K, types=types, tokenizer=tiny_tokenizer(),
    )  # fmt: skip
    path = tmp_path / "q3.gguf"
    write_model_gguf(path, spec)
    ours = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    assert ours.arch.head_dim == 32 and ours.arch.qk_norm and not ours.arch.attention_bias

    config = transformers.Qwen3Config(
        vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    hf = transformers.Qwen3ForCausalLM(config).eval()
    reader = gguf.GGUFReader(path)
    state = {
        hf_name(t.name): torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        )
        for t in reader.tensors
    }
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(0, TINY_VOCAB, (19,), generator=torch.Generator().manual_seed(3))
    got = _Paged(ours).step([(0, 19, 19)], ids)
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=ATOL)


def test_llama_qk_rows_are_unpermuted_exactly(tmp_path: Path) -> None:
    spec = ModelSpec("llama", matrix_type=Q.F32, qkv_bias=True, tokenizer=tiny_tokenizer())
    path = tmp_path / "llama.gguf"
    original = write_model_gguf(path, spec)
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False).model
    attn = model.model.layers[1].self_attn
    for ours, name in (
        (attn.q_proj.weight, "blk.1.attn_q.weight"),
        (attn.k_proj.weight, "blk.1.attn_k.weight"),
        (attn.q_proj.bias, "blk.1.attn_q.bias"),
        (attn.k_proj.bias, "blk.1.attn_k.bias"),
    ):
        assert torch.equal(ours, torch.from_numpy(original[name])), name
    w = torch.arange(24.0).reshape(8, 3)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 2))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, 2), w)


def test_config_from_metadata(tmp_path: Path) -> None:
    spec = ModelSpec("qwen2", qkv_bias=True, tied=True, context=512, rope_theta=1e6)
    path = _write(tmp_path, spec)
    arch = ArchConfig.from_dir(path)
    assert arch.architecture == "Qwen2ForCausalLM" and arch.source == str(path.resolve())
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size) == (TINY_VOCAB, 64, 96)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (4, 2, 16)
    assert arch.max_position_embeddings == 512 and arch.rope_theta == 1e6
    assert arch.tie_word_embeddings and arch.attention_bias and not arch.attention_out_bias
    assert arch.bos_token_id == 260 and arch.eos_token_id == (261,)
    assert ArchConfig.from_dir(tmp_path) == arch  # a directory holding one GGUF
    loaded = load_model(tmp_path, dtype=torch.bfloat16, device="cpu", progress=False)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.num_bytes == sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)


def _reader_view(path: Path) -> tuple[dict, list[tuple]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [
        (t.name, int(t.tensor_type), tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    return fields, tensors


@pytest.mark.parametrize("case", ["builtin", "synthetic"])
def test_header_equals_the_gguf_packages_reader(case: str, tmp_path: Path) -> None:
    """lmfleet's header parser reads every key/value and tensor entry exactly as
    ``gguf.GGUFReader`` does (values, their order, shapes, offsets, sizes)."""
    if case == "builtin":
        path = find_gguf(DEFAULT_MODEL)
        assert path is not None
    else:
        spec = ModelSpec("qwen3", qk_norm=True, types={"blk.0.ffn_up.weight": Q.Q5_0})
        spec.extra_metadata = {"general.name": "ünïcode ✓", "qwen3.some.flag": True}
        path = _write(tmp_path, spec)
    header = read_header(path)
    fields, tensors = _reader_view(path)
    assert list(header.metadata) == list(fields)
    assert dict(header.metadata) == fields
    got = [(t.name, t.qtype, t.shape, t.offset, t.nbytes) for t in header.tensors]
    assert got == tensors


def test_find_gguf(tmp_path: Path) -> None:
    assert find_gguf(tmp_path) is None
    assert find_gguf(tmp_path / "missing-dir") is None
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        find_gguf(tmp_path / "missing.gguf")
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_gguf(tmp_path) is None  # a safetensors checkpoint wins
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        find_gguf(tmp_path)


def test_unsupported_storage_type_names_the_tensor_and_type(tmp_path: Path) -> None:
    spec = ModelSpec("qwen2", hidden=256, ffn=256, heads=4, kv_heads=2)
    spec.types = {"blk.1.ffn_down.weight": Q.IQ4_NL}
    path = _write(tmp_path, spec)
    with pytest.raises(
        ModelLoadError, match=r"model\.gguf: tensor blk\.1\.ffn_down\.weight is stored as IQ4_NL"
    ):
        load_model(path, dtype=torch.float32, device="cpu", progress=False)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gemma2' is unsupported"):
        load_model(path, dtype=torch.float32, device="cpu", progress=False)


def test_rope_scaling_and_partial_rotary_are_refused(tmp_path: Path) -> None:
    scaled = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    with pytest.raises(ModelLoadError, match=r"rope\.scaling\.type 'linear' is unsupported"):
        ArchConfig.from_dir(_write(tmp_path, ModelSpec("llama", extra_metadata=scaled)))
    partial = {"qwen2.rope.dimension_count": 8}
    spec = ModelSpec("qwen2", extra_metadata=partial, head_dim=16)
    with pytest.raises(ModelLoadError, match="partial rotary embeddings are unsupported"):
        ArchConfig.from_dir(_write(tmp_path, spec))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ModelLoadError, match=r"broken\.gguf: not a readable GGUF file"):
        ArchConfig.from_dir(path)


def test_missing_tensor(tmp_path: Path) -> None:
    spec = ModelSpec("qwen2", layers=2)
    path = tmp_path / "m.gguf"
    tensors = write_model_gguf(path, spec)
    # rewrite without one layer's v projection
    writer = gguf.GGUFWriter(str(path), "qwen2")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        if t.name != "blk.1.attn_v.weight":
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    del reader
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "blk.1.attn_v.weight" in tensors
    with pytest.raises(
        ModelLoadError, match=r"missing tensor for model\.layers\.1\.self_attn\.v_proj"
    ):
        load_model(path, dtype=torch.float32, device="cpu", progress=False)
