"""The fleet file: validation errors named by their path, the example validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmfleet.errors import ConfigError
from lmfleet.fleet.config import load_config, loc_path, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


def _doc(**model):
    base = {"name": "m", "versions": [{"name": "v1", "replicas": ["http://h:1"]}]}
    return {"models": [{**base, **model}]}


def _errors(doc) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return str(info.value)


def test_example_fleet_file_validates():
    cfg = load_config(EXAMPLE)
    m = cfg.model("llama-8b")
    assert m is not None and [v.name for v in m.versions] == ["v1", "v2"]
    assert m.shadow is not None and m.shadow.percent == 5
    assert cfg.api_keys[0].rpm == 600


def test_negative_weight_is_reported_by_path():
    doc = _doc(versions=[{"name": "a"}, {"name": "b", "weight": -1}])
    assert "models[0].versions[1].weight: must be ≥ 0" in _errors(doc)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"queue": {"max_queue": -1}}, "models[0].queue.max_queue: must be ≥ 0"),
        ({"queue": {"max_wiat_s": 3}}, "models[0].queue.max_wiat_s: unknown key"),
        ({"balancing": {"policy": "random"}}, "models[0].balancing.policy:"),
        ({"shadow": {"version": "v9", "percent": 5}}, "shadow.version 'v9' is not one of"),
        ({"shadow": {"version": "v1", "percent": 150}}, "models[0].shadow.percent: must be ≤ 100"),
        (
            {"versions": [{"name": "a", "replicas": ["h:1"]}]},
            "models[0].versions[0]: replicas[0]: 'h:1' must start with http",
        ),
        ({"versions": [{"name": "a"}, {"name": "a"}]}, "version names must be unique"),
        ({"versions": []}, "models[0].versions:"),
    ],
)
def test_errors_name_the_field(change, expected):
    assert expected in _errors(_doc(**change))


def test_every_error_is_listed():
    doc = _doc(versions=[{"name": "a", "weight": -1}], queue={"max_queue": -2})
    msg = _errors(doc)
    assert "models[0].versions[0].weight" in msg and "models[0].queue.max_queue" in msg


def test_api_key_needs_exactly_one_source_and_top_level_shape():
    doc = {**_doc(), "api_keys": [{"name": "k", "key": "a", "key_env": "B"}]}
    assert "api_keys[0]: give exactly one of 'key' and 'key_env'" in _errors(doc)
    assert "top level must be a mapping" in _errors(["x"])
    assert "(top level)" in _errors({}) or "models: Field required" in _errors({})


def test_loc_path_skips_union_members():
    assert loc_path(("models", 0, "versions", 1, "weight")) == "models[0].versions[1].weight"
    assert loc_path(("a", "function-after[f(), int]", 2)) == "a[2]"


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_bytes(b"models:\n  - name: \xe9t\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 18\)"):
        load_config(bad)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ({"name": "a", "weight": float("inf")}, "weight: must be a finite number ≥ 0"),
        ({"name": "a", "weight": float("nan")}, "weight: must be a finite number ≥ 0"),
        ({"name": "a", "replicas": ["http://h:99999"]}, "a port is 1..65535"),
        ({"name": "a", "replicas": ["http://"]}, "has no host"),
        ({"name": "a", "replicas": ["ftp://h:1"]}, "must start with http:// or https://"),
    ],
)
def test_weights_and_replica_urls_are_checked(version, expected):
    assert expected in _errors(_doc(versions=[version]))


def test_a_rollout_starts_below_100_percent():
    rollout = {"baseline": "v1", "candidate": "v2", "steps": [{"weight": 100}]}
    doc = _doc(versions=[{"name": "v1"}, {"name": "v2"}], rollout=rollout)
    assert "models[0].rollout.steps: the first step must stay below 100" in _errors(doc)
