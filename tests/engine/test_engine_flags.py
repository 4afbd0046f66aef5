"""``lmfleet generate --attention-backend / --quantization``: listed, checked before
anything loads, and wired through to the engine config."""

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


@pytest.mark.parametrize(
    ("flag", "value"), [("--quantization", "int4"), ("--attention-backend", "flash")]
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


def test_generate_runs_int8_on_cpu(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello"]
    argv += ["--max-tokens", "3", "--ignore-eos", "--quantization", "int8"]
    argv += ["--attention-backend", "torch"]
    assert main(argv) == 0
    assert "3 tokens" in capsys.readouterr().err
