"""The fleet file's managed versions: what a replica runs (model, engine
arguments checked against ``lmfleet serve``), how many (replicas), the policy's
knobs, the provider and autoscaler sections, and the built-in and example fleets."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmfleet.autoscaler.baselines import KedaConfig
from lmfleet.autoscaler.controller import replica_spec
from lmfleet.autoscaler.observation import AutoscalingConfig
from lmfleet.errors import ConfigError
from lmfleet.fleet.config import engine_flags, load_config, parse_config
from lmfleet.fleet.up import default_fleet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _version(**v):
    return {"models": [{"name": "chat", "versions": [{"name": "v1", **v}]}]}


def _errors(doc) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return str(info.value)


def test_a_managed_version_becomes_a_replica_spec_and_a_policy_config():
    cfg = parse_config(_version(
        model="sim:llama-8b-h100", engine_args={"max-num-seqs": 64, "enforce_eager": True,
                                                "async-scheduling": False},
        env={"OMP_NUM_THREADS": "2"}, replicas={"min": 0, "max": 5, "standby": 1},
        autoscaling={"target_per_replica": 8, "stabilization_window_s": 30},
        drain_timeout_s=90, load_timeout_s=120,
    ))  # fmt: skip
    ((mcfg, vcfg),) = cfg.managed()
    assert vcfg.serve_args() == ("--max-num-seqs", "64", "--enforce-eager")
    spec = replica_spec(mcfg, vcfg)
    assert spec.model == "sim:llama-8b-h100" and spec.version == "chat/v1"
    assert spec.engine_args == ("--max-num-seqs", "64", "--enforce-eager",
                                "--served-model-name", "chat", "--version-label", "v1")  # fmt: skip
    assert (spec.env, spec.drain_timeout_s, spec.load_timeout_s) == (
        {"OMP_NUM_THREADS": "2"}, 90, 120)  # fmt: skip
    assert vcfg.policy_config() == AutoscalingConfig(
        min_replicas=0, max_replicas=5, standby=1, target_per_replica=8,
        stabilization_window_s=30,
    )  # fmt: skip


def test_the_autoscaling_section_has_the_policy_defaults():
    vcfg = parse_config(_version(model="default")).models[0].versions[0]
    assert vcfg.policy_config() == AutoscalingConfig()
    assert vcfg.autoscaling.enabled is True


def test_policy_keda_takes_the_knobs_of_its_section():
    vcfg = parse_config(_version(
        model="default", replicas={"min": 0, "max": 6}, drain_timeout_s=30,
        autoscaling={"policy": "keda", "keda": {"polling_interval_s": 30, "threshold": 5}},
    )).models[0].versions[0]  # fmt: skip
    assert vcfg.policy_config() == KedaConfig(min_replicas=0, max_replicas=6, polling_interval_s=30)
    defaults = parse_config(_version(model="default", autoscaling={"policy": "keda"}))
    assert defaults.models[0].versions[0].policy_config() == KedaConfig()


@pytest.mark.parametrize(
    ("autoscaling", "replicas", "expected"),
    [
        ({"keda": {"threshold": 3}}, {}, "keda: only applies with policy: keda"),
        ({"policy": "keda", "target_per_replica": 3}, {},
         "target_per_replica: knob(s) of policy lmfleet, not read with policy keda"),
        ({"policy": "keda", "keda": {"treshold": 3}}, {},
         "autoscaling.keda.treshold: unknown key"),
        ({"policy": "keda", "keda": {"tolerance": 2}}, {}, "autoscaling.keda.tolerance must be in"),
        ({"policy": "keda"}, {"max": 3, "standby": 1}, "policy keda keeps no standby"),
    ],
)  # fmt: skip
def test_policy_keda_errors_show_the_fix(autoscaling, replicas, expected):
    doc = _version(model="default", autoscaling=autoscaling, **({"replicas": replicas}
                                                                   if replicas else {}))  # fmt: skip
    assert expected in _errors(doc)


def test_served_model_name_is_what_the_replicas_serve():
    cfg = parse_config(_version(model="default", served_model_name="smollm2-135m"))
    spec = replica_spec(*cfg.managed()[0])
    assert spec.engine_args[-4:-2] == ("--served-model-name", "smollm2-135m")


def test_engine_args_as_a_list_are_flags_already():
    assert engine_flags(["--dtype", "float32", "--quantization=int8"]) == (
        "--dtype", "float32", "--quantization=int8")  # fmt: skip
    with pytest.raises(ValueError, match=r"engine_args\.dtype: give one value"):
        engine_flags({"dtype": ["float32", "bfloat16"]})


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ({"model": "default", "engine_args": {"dtyp": "float32"}},
         "models[0].versions[0]: --dtyp is not an option of lmfleet serve"),
        ({"model": "default", "engine_args": {"port": 9000}},
         "models[0].versions[0]: --port is set by lmfleet for each replica"),
        ({"engine_args": {"dtype": "float32"}}, "engine_args needs a model to run"),
        ({"model": "default", "replicas": {"min": 3, "max": 2}},
         "models[0].versions[0].replicas: min (3) is above max (2)"),
        ({"model": "default", "replicas": {"max": 2, "standby": 3}},
         "standby (3) is above max (2)"),
        ({"model": "default", "replicas": {"max": 0}},
         "models[0].versions[0].replicas.max: must be ≥ 1"),
        ({"model": "default", "autoscaling": {"target_per_replica": 0}},
         "autoscaling.target_per_replica must be a number > 0"),
        ({"model": "default", "autoscaling": {"panic_threshold": 1}},
         "autoscaling.panic_threshold must be > 1"),
        ({"model": "default", "autoscaling": {"stabilisation_window_s": 1}},
         "models[0].versions[0].autoscaling.stabilisation_window_s: unknown key"),
        ({"model": "default", "autoscaling": {"policy": "hpa"}},
         "models[0].versions[0].autoscaling.policy:"),
        ({"model": "default", "drain_timeout_s": 0},
         "models[0].versions[0].drain_timeout_s: must be > 0"),
        ({"replicas": ["http://h:1"], "urls": ["http://h:2"]}, "give static replicas once"),
    ],
)  # fmt: skip
def test_errors_name_the_field(version, expected):
    assert expected in _errors(_version(**version))


def test_a_list_of_replicas_means_static_urls():
    vcfg = parse_config(_version(replicas=["http://h:1/"])).models[0].versions[0]
    assert vcfg.urls == ["http://h:1"] and not vcfg.managed


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"provider": {"kind": "kubernetes"}}, "provider.kind:"),
        ({"provider": {"kill_grace_s": 0}}, "provider.kill_grace_s: must be > 0"),
        ({"autoscaler": {"interval_s": 0}}, "autoscaler.interval_s: must be > 0"),
        ({"autoscaler": {"history": 0}}, "autoscaler.history: must be ≥ 1"),
        ({"deploy": {}}, "deploy: unknown key"),
    ],
)
def test_provider_and_autoscaler_sections_are_typed(section, expected):
    assert expected in _errors({**_version(model="default"), **section})


def test_the_built_in_fleet():
    cfg = default_fleet()
    (model,) = cfg.models
    assert model.name == "smollm2"
    assert [(v.name, v.weight, v.model) for v in model.versions] == [
        ("v1", 90, "default"), ("v2", 10, "default")]  # fmt: skip
    v1, v2 = model.versions
    assert (v1.replicas.min, v1.replicas.max, v1.replicas.standby) == (1, 2, 1)
    assert "--quantization" in v2.serve_args() and "int8" in v2.serve_args()
    assert v1.serve_args() == ("--dtype", "float32")


@pytest.mark.parametrize("name", ["fleet.yaml", "sim-fleet.yaml"])
def test_the_examples_validate(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.models
