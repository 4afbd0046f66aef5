"""The safetensors loader: layouts, dtypes, meta-device construction, and the
errors for broken model directories (each naming the file)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmfleet.engine.models.loader as loader
from lmfleet.engine.models.config import ArchConfig
from lmfleet.engine.models.loader import load_model
from lmfleet.engine.models.synthetic import write_random_checkpoint
from lmfleet.errors import ModelLoadError

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
}


def _load(path: Path, dtype: torch.dtype = torch.float32, **kw: object) -> loader.LoadedModel:
    return load_model(path, dtype=dtype, device="cpu", progress=False, **kw)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def test_sharded_loads_like_unsharded(tmp_path: Path) -> None:
    single = write_random_checkpoint(tmp_path / "single", **TINY, seed=3)
    sharded = write_random_checkpoint(tmp_path / "sharded", **TINY, seed=3, shard_bytes=20_000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    a, b = _state(_load(single).model), _state(_load(sharded).model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_dtypes(tmp_path: Path, dtype: torch.dtype, stored: str) -> None:
    path = write_random_checkpoint(tmp_path, **TINY, dtype=stored)
    loaded = _load(path, dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    assert loaded.num_bytes == sum(t.nbytes for t in load_file(path / "model.safetensors").values())
    assert loaded.bytes_per_second > 0
    # it runs
    from tests.engine.layers.paged_kv import BlockLayout, positions_for

    arch = loaded.arch
    caches = [
        torch.zeros(2, 4, 4, arch.num_key_value_heads, arch.head_dim, dtype=dtype)
        for _ in range(arch.num_hidden_layers)
    ]
    steps = [(0, 5, 5)]
    hidden = loaded.model(
        torch.arange(5), positions_for(steps), caches, BlockLayout(4, 4).metadata(steps)
    )
    logits = loaded.model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (5, 96)
    assert torch.isfinite(logits).all()


def test_built_on_meta_and_parameters_are_the_loaded_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    produced: list[int] = []
    convert = loader._convert

    def spy(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = convert(tensor, dtype, device)
        produced.append(out.data_ptr())
        return out

    monkeypatch.setattr(loader, "_convert", spy)
    model = _load(path).model
    params = list(model.parameters())
    assert not any(p.is_meta for p in params)
    assert not any(b.is_meta for b in model.buffers())
    assert sorted(p.data_ptr() for p in params) == sorted(produced)
    assert not any(p.requires_grad for p in params)


def test_tied_embeddings_without_lm_head(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = _load(path).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_logs_throughput(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    with caplog.at_level(logging.INFO, logger="lmfleet.engine.models.loader"):
        _load(path)
    assert any("MB/s" in r.getMessage() for r in caplog.records)


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    load_model(path, dtype=torch.float32, device="cpu", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "loading weights" in captured.err


# --- errors -------------------------------------------------------------------


def _rewrite(path: Path, edit: object) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_directory_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        _load(tmp_path / "nowhere")
    path = write_random_checkpoint(tmp_path / "m", **TINY)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(path)


def test_missing_shard(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY, shard_bytes=20_000)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        _load(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    _rewrite(path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: missing tensor model\.layers\.1\.mlp"
    ):
        _load(path)


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY, shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    _rewrite(path / shard, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ModelLoadError, match=rf"{shard}.*model\.norm\.weight"):
        _load(path)


def test_wrong_shape(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    _rewrite(path / "model.safetensors", edit)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj"
    ):
        _load(path)


def test_unexpected_tensor(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # tolerated

    _rewrite(path / "model.safetensors", edit)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.extra"
    ):
        _load(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError,
        match=r"unsupported architecture GPT2LMHeadModel in .*config\.json; supported: LlamaForCausalLM",
    ):
        _load(path)


def test_unsupported_rope_type(tmp_path: Path) -> None:
    path = write_random_checkpoint(tmp_path, **TINY)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json: rope type 'yarn'"):
        _load(path)


# --- config parsing ---------------------------------------------------------------

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 10,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "max_position_embeddings": 256,
}
_LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_config_defaults_and_kv_bytes() -> None:
    cfg = ArchConfig.from_dict({**_BASE, "eos_token_id": [7, 9]})
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 8
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.eos_token_id == (7, 9)
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 3 * 8 * 8 * 2


def test_both_rope_formats_agree() -> None:
    legacy = ArchConfig.from_dict(
        {**_BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **_LLAMA3}}
    )
    legacy_type = ArchConfig.from_dict(
        {**_BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **_LLAMA3}}
    )
    new = ArchConfig.from_dict(
        {**_BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **_LLAMA3}}
    )
    assert legacy == new == legacy_type
    assert new.rope_theta == 5e5 and new.rope_scaling == {"rope_type": "llama3", **_LLAMA3}
    default = ArchConfig.from_dict(
        {**_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    )
    assert default.rope_scaling is None and default.rope_theta == 7.0


def test_family_flags() -> None:
    qwen2 = ArchConfig.from_dict(
        {**_BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
    )
    assert qwen2.attention_bias and not qwen2.attention_out_bias and qwen2.sliding_window is None
    qwen3 = ArchConfig.from_dict({**_BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16})
    assert qwen3.qk_norm and qwen3.head_dim == 16 and not qwen3.attention_bias
    mistral = ArchConfig.from_dict(
        {**_BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 128}
    )
    with pytest.raises(ModelLoadError, match="sliding_window=128"):
        mistral.check_max_model_len(256)
    mistral.check_max_model_len(128)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": None}, "missing required key 'vocab_size'"),
        ({"architectures": []}, "architectures"),
    ],
)
def test_bad_configs(edit: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ArchConfig.from_dict({**_BASE, **edit}, source="/m/config.json")
