"""``lmfleet generate --attention-backend / --quantization / --kv-cache-dtype``:
listed, checked before anything loads, and wired through to the engine config."""

from __future__ import annotations

import pytest

import lmfleet.cli as cli
from lmfleet.cli import build_parser, main


def test_help_lists_and_explains_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--attention-backend {auto,triton,torch}" in text
    assert "--quantization {none,int8,fp8}" in text
    assert "H100/H200-class GPU" in text and "works on CPU" in text
    assert "--kv-cache-dtype {auto,fp8}" in text
    assert "auto: the model's --dtype" in text and "fp8: float8 e4m3 with a per-layer" in text
    assert "--kv-cache-scales {auto,calibrate,unit}" in text
    assert "auto: the checkpoint's k_scale/v_scale tensors" in text
    assert "calibrate: measure each layer's largest |K| and |V|" in text
    assert "twice the cached tokens" in text and "3 mantissa bits" in text


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--quantization", "int4"),
        ("--attention-backend", "flash"),
        ("--kv-cache-dtype", "fp4"),
        ("--kv-cache-scales", "dynamic"),
    ],
)
def test_bad_value_fails_before_loading(flag, value, capsys, monkeypatch):
    def must_not_load(args):
        raise AssertionError("the model was resolved despite a bad flag")

    monkeypatch.setattr(cli, "_resolve_model", must_not_load)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "hi", flag, value])
    assert exit_.value.code == 2
    assert f"{flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_flags_reach_the_engine_config():
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--attention-backend", "torch", "--quantization", "fp8"]
    )
    cfg = cli._engine_config(args, "model-dir")
    assert (cfg.model.attention_backend, cfg.model.quantization) == ("torch", "fp8")
    defaults = cli._engine_config(build_parser().parse_args(["generate", "--prompt", "hi"]), "m")
    assert (defaults.model.attention_backend, defaults.model.quantization) == ("auto", None)
    assert defaults.cache.kv_cache_dtype == "auto"
    assert defaults.cache.kv_cache_scales == "auto"
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--kv-cache-dtype", "fp8", "--kv-cache-scales", "unit"]
    )
    cache = cli._engine_config(args, "model-dir").cache
    assert (cache.kv_cache_dtype, cache.kv_cache_scales) == ("fp8", "unit")


def test_kv_cache_dtype_is_validated_by_the_config():
    from lmfleet.engine.config import CacheConfig, engine_config
    from lmfleet.errors import ConfigError

    assert engine_config("m", kv_cache_dtype="fp8").cache.kv_cache_dtype == "fp8"
    for bad in ("fp16", "FP8", ""):
        with pytest.raises(ConfigError, match=r"^kv_cache_dtype: must be one of 'auto', 'fp8'"):
            CacheConfig(kv_cache_dtype=bad)


def test_generate_runs_int8_on_cpu(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello"]
    argv += ["--max-tokens", "3", "--ignore-eos", "--quantization", "int8"]
    argv += ["--attention-backend", "torch"]
    assert main(argv) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_generate_runs_an_fp8_kv_cache_on_cpu(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello"]
    argv += ["--max-tokens", "3", "--ignore-eos", "--kv-cache-dtype", "fp8"]
    argv += ["--attention-backend", "torch", "--dtype", "bfloat16"]
    assert main(argv) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_cuda_graph_flags_reach_the_engine_config():
    from lmfleet.engine.config import engine_config
    from lmfleet.errors import ConfigError

    defaults = cli._engine_config(build_parser().parse_args(["generate", "--prompt", "hi"]), "m")
    assert (defaults.model.enforce_eager, defaults.model.max_seq_len_to_capture) == (False, 8192)
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--enforce-eager", "--max-seq-len-to-capture", "2048"]
    )
    cfg = cli._engine_config(args, "m")
    assert (cfg.model.enforce_eager, cfg.model.max_seq_len_to_capture) == (True, 2048)
    with pytest.raises(ConfigError, match=r"^max_seq_len_to_capture: must be positive"):
        engine_config("m", max_seq_len_to_capture=0)


def test_async_scheduling_flag_reaches_generate_and_serve():
    from lmfleet.server.settings import ServerSettings

    parse = build_parser().parse_args
    default = cli._engine_config(parse(["generate", "--prompt", "hi"]), "m")
    assert default.scheduler.async_scheduling is None  # on for CUDA, off elsewhere
    for flag, want in (("--async-scheduling", True), ("--no-async-scheduling", False)):
        cfg = cli._engine_config(parse(["generate", "--prompt", "hi", flag]), "m")
        assert cfg.scheduler.async_scheduling is want
        served = ServerSettings.from_args(parse(["serve", "m", "--device", "cpu", flag]))
        assert served.engine_config().scheduler.async_scheduling is want
    served = ServerSettings.from_args(parse(["serve", "m", "--device", "cpu"]))
    assert served.engine_config().scheduler.async_scheduling is None


def test_generate_runs_with_async_scheduling_on_cpu(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello"]
    argv += ["--max-tokens", "5", "--ignore-eos", "--async-scheduling"]
    assert main(argv) == 0
    assert "5 tokens" in capsys.readouterr().err
