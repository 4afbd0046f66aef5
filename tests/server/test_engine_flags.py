"""``lmfleet serve --attention-backend / --quantization``: listed, checked by
argparse before anything loads, and carried by ``ServerSettings`` into the engine
config."""

from __future__ import annotations

import pytest

from lmfleet.cli import build_parser, main
from lmfleet.server.settings import ServerSettings


def test_help_lists_and_explains_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--attention-backend {auto,triton,torch}" in text
    assert "--quantization {none,int8,fp8}" in text
    assert "H100/H200-class GPU" in text and "weight-only int8" in text


@pytest.mark.parametrize(
    ("flag", "value"), [("--quantization", "int4"), ("--attention-backend", "flash")]
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


def test_extra_engine_settings_override_the_flat_ones(tmp_path):
    s = ServerSettings(
        model=str(tmp_path), device="cpu", quantization="int8", extra_engine={"quantization": "fp8"}
    )
    assert s.engine_config().model.quantization == "fp8"
