"""``lmfleet serve --attention-backend / --quantization / --kv-cache-dtype``: listed,
checked by argparse before anything loads, and carried by ``ServerSettings`` into the
engine config."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lmfleet.cli import build_parser, main
from lmfleet.errors import ConfigError
from lmfleet.server.settings import ServerSettings


def test_help_lists_and_explains_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--attention-backend {auto,triton,torch}" in text
    assert "--quantization {none,int8,fp8}" in text
    assert "H100/H200-class GPU" in text and "weight-only int8" in text
    assert "--kv-cache-dtype {auto,fp8}" in text
    assert "auto: the model's --dtype" in text and "fp8: float8 e4m3 with a per-layer" in text
    assert "--kv-cache-scales {auto,calibrate,unit}" in text
    assert "auto: the checkpoint's k_scale/v_scale tensors" in text
    assert "calibrate: measure each layer's largest |K| and |V|" in text


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--quantization", "int4"),
        ("--attention-backend", "flash"),
        ("--kv-cache-dtype", "e5m2"),
        ("--kv-cache-scales", "dynamic"),
    ],
)
def test_bad_value_fails_before_loading(flag, value, capsys, monkeypatch):
    import lmfleet.server.serve as serve

    def must_not_run(args):
        raise AssertionError("serve started despite a bad flag")

    monkeypatch.setattr(serve, "run_serve", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "some-model", flag, value])
    assert exit_.value.code == 2
    assert f"{flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_flags_reach_the_engine_config(tmp_path):
    argv = ["serve", str(tmp_path), "--device", "cpu"]
    args = build_parser().parse_args(
        [*argv, "--attention-backend", "torch", "--quantization", "int8"]
    )
    s = ServerSettings.from_args(args)
    assert (s.attention_backend, s.quantization) == ("torch", "int8")
    cfg = s.engine_config()
    assert (cfg.model.attention_backend, cfg.model.quantization) == ("torch", "int8")
    cfg = ServerSettings.from_args(build_parser().parse_args(argv)).engine_config()
    assert (cfg.model.attention_backend, cfg.model.quantization) == ("auto", None)
    assert cfg.cache.kv_cache_dtype == "auto"


def test_kv_cache_dtype_reaches_the_engine_config(tmp_path):
    args = build_parser().parse_args(
        ["serve", str(tmp_path), "--kv-cache-dtype", "fp8", "--kv-cache-scales", "calibrate"]
    )
    s = ServerSettings.from_args(args)
    assert (s.kv_cache_dtype, s.kv_cache_scales) == ("fp8", "calibrate")
    cache = s.engine_config().cache
    assert (cache.kv_cache_dtype, cache.kv_cache_scales) == ("fp8", "calibrate")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        ServerSettings(model=str(tmp_path), device="cpu", kv_cache_dtype="int8").engine_config()


def test_replica_serves_with_an_fp8_kv_cache(tiny_model_dir):
    """A replica started from ``--kv-cache-dtype fp8`` answers a chat request from an
    fp8 cache with 4x the blocks the same budget buys the CPU's float32 model."""
    import asyncio

    import torch

    from lmfleet.server.replica import Replica

    from .conftest import KV_BYTES, chat_body, serving

    argv = ["serve", str(tiny_model_dir), "--device", "cpu", "--kv-cache-dtype", "fp8"]
    argv += ["--kv-cache-memory", str(KV_BYTES), "--max-model-len", "512"]
    settings = ServerSettings.from_args(build_parser().parse_args(argv))
    settings = replace(settings, progress=False, served_model_names=("tiny",))

    async def main() -> None:
        async with serving(tiny_model_dir, replica=Replica(settings)) as (client, rep):
            r = await client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
            runner = rep.engine.core.runner
            assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
            # the tiny model's float32 cache: 512 blocks of 16 tokens in KV_BYTES
            assert rep.engine.stats().num_blocks == 4 * 512

    asyncio.run(main())


def test_extra_engine_settings_override_the_flat_ones(tmp_path):
    s = ServerSettings(
        model=str(tmp_path), device="cpu", quantization="int8", extra_engine={"quantization": "fp8"}
    )
    assert s.engine_config().model.quantization == "fp8"


def test_cuda_graph_flags_reach_the_engine_config(tmp_path):
    argv = ["serve", str(tmp_path), "--enforce-eager", "--max-seq-len-to-capture", "4096"]
    s = ServerSettings.from_args(build_parser().parse_args(argv))
    cfg = s.engine_config()
    assert (cfg.model.enforce_eager, cfg.model.max_seq_len_to_capture) == (True, 4096)
    cfg = ServerSettings.from_args(build_parser().parse_args(["serve", str(tmp_path)]))
    assert cfg.engine_config().model.enforce_eager is False
