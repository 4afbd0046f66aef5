"""The fleet file: one typed model read by the gateway, the autoscaler, the
providers (and ``lmfleet deploy``). Models, their versions, traffic weights,
stickiness, shadow traffic, balancing, queue limits, API keys, timeouts; per version
what to run (``model``, ``engine_args``), how many (``replicas: {min, max,
standby}``), how to scale it (``autoscaling``) or the URLs of replicas run outside
lmfleet (``urls``); and who runs replicas (``provider``) and how often the
autoscaler decides (``autoscaler``).

Validated with pydantic at load time; every error is reported by its path in the
file (``models[0].versions[1].weight: must be ≥ 0``) by :func:`format_errors`, so
the message shows where to fix it. Unknown keys are errors (a typo is never a
silently ignored setting).

A version is *managed* when it names a ``model``: the autoscaler starts and stops
its replicas through the provider. ``urls`` are static replicas the gateway routes
to as they are (a version may have both). For files written before managed
versions existed, ``replicas`` may still be a list of URLs: it means ``urls``.

Replica lists are only the starting point: :mod:`lmfleet.gateway.registry` adds and
removes replicas at run time (the autoscaler does), without touching this file.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lmfleet.autoscaler.baselines import KedaConfig
from lmfleet.autoscaler.observation import AutoscalingConfig
from lmfleet.errors import ConfigError

BALANCERS = ("round_robin", "least_outstanding", "prefix_affinity", "kv_aware")


def check_replica_url(url: object) -> str:
    """A replica's base URL, without its trailing ``/``; ``ValueError`` saying what is
    wrong (scheme, host, port) otherwise. The fleet file and the admin API share it,
    so no entry that can never be routed gets in."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("give the replica's base URL, e.g. http://10.0.0.5:8000")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of 0..65535, or not a number
        raise ValueError(f"{url!r}: {exc}; a port is 1..65535") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host (e.g. http://10.0.0.5:8000)")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 cannot be connected to; a port is 1..65535")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL has no query or fragment")
    return url.rstrip("/")


def check_weight(weight: float) -> float:
    """A traffic weight: finite and ≥ 0 (``ValueError`` otherwise)."""
    if isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"must be a finite number ≥ 0, got {weight}")
    return float(weight)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BalancingConfig(_Section):
    policy: Literal["round_robin", "least_outstanding", "prefix_affinity", "kv_aware"] = (
        "least_outstanding"
    )
    #: keyword arguments of the policy (``make_balancer(policy, **params)``)
    params: dict[str, Any] = Field(default_factory=dict)


class StickinessConfig(_Section):
    #: keep one ``user`` (the request body field) on one version
    by_user: bool = True
    #: and/or a session header (e.g. ``x-session-id``); the header wins when both are set
    header: str | None = None


class ShadowConfig(_Section):
    #: the version that receives the copies; its answers are discarded
    version: str
    percent: float = Field(ge=0, le=100)
    #: copies in flight at once; beyond it a copy is skipped (shadows never queue)
    max_inflight: int = Field(64, ge=1)


class QueueConfig(_Section):
    #: requests waiting for a slot per model and version; beyond it 429
    max_queue: int = Field(1024, ge=0)
    #: longest wait for a slot; then 503 (no capacity) or 429
    max_wait_s: float = Field(30.0, gt=0)
    #: requests in flight on one replica; a replica at the cap gets no more
    max_inflight_per_replica: int = Field(256, ge=1)


class ReplicaCounts(_Section):
    """How many replicas the autoscaler keeps of a managed version."""

    min: int = Field(1, ge=0)
    max: int = Field(4, ge=1)
    #: replicas kept ASLEEP (weights in host memory, accelerator memory freed),
    #: woken in seconds instead of a cold start; they count toward ``max``
    standby: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaCounts:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        if self.standby > self.max:
            raise ValueError(
                f"standby ({self.standby}) is above max ({self.max}): sleeping replicas "
                "count toward max"
            )
        return self


#: a policy config's replica counts: they come from the version's ``replicas:``
_COUNTS = frozenset({"min_replicas", "max_replicas", "standby"})


def _knobs(dataclass_type: type) -> dict[str, Any]:
    """A policy config dataclass's fields except the replica counts, as pydantic
    fields with the same types and defaults (so the two never disagree)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(dataclass_type)
    return {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(dataclass_type)
        if f.name not in _COUNTS
    }


#: ``autoscaling.keda:`` the knobs of the KEDA + HPA baseline (``policy: keda``)
KedaSection = create_model(
    "KedaSection",
    __base__=_Section,
    __doc__="The KEDA + HPA baseline's knobs (lmfleet.autoscaler.baselines.KedaConfig).",
    **_knobs(KedaConfig),
)

#: the lmfleet policy's knobs, at the top of ``autoscaling:``
_LMFLEET_KNOBS = frozenset(_knobs(AutoscalingConfig))


class _AutoscalingBase(_Section):
    @model_validator(mode="after")
    def _one_policy(self) -> _AutoscalingBase:
        policy = getattr(self, "policy", "lmfleet")
        if policy != "keda" and getattr(self, "keda", None) is not None:
            raise ValueError(
                "keda: only applies with policy: keda; add policy: keda or remove the section"
            )
        if policy == "keda":
            ignored = sorted(self.model_fields_set & _LMFLEET_KNOBS)
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)}: knob(s) of policy lmfleet, not read with policy "
                    "keda; set the keda: section's knobs instead (docs/autoscaler.md)"
                )
        return self


def _autoscaling_section() -> type[BaseModel]:
    """``autoscaling:`` of a version: every knob of the policy's
    :class:`~lmfleet.autoscaler.observation.AutoscalingConfig` except the replica
    counts (``replicas:``), with the same defaults; docs/autoscaler.md explains them.
    Built from the dataclass so that the two never disagree on a name or default.
    With ``policy: keda`` the KEDA + HPA baseline decides instead, with the knobs of
    its ``keda:`` subsection (:class:`~lmfleet.autoscaler.baselines.KedaConfig`)."""
    return create_model(
        "AutoscalingSection",
        __base__=_AutoscalingBase,
        __doc__="A managed version's autoscaling policy knobs.",
        #: off: the replicas stay at ``replicas.min`` (no decisions are made)
        enabled=(bool, True),
        #: which policy decides: lmfleet's, or the KEDA + HPA baseline
        policy=(Literal["lmfleet", "keda"], "lmfleet"),
        keda=(KedaSection | None, None),  # type: ignore[valid-type]
        **_knobs(AutoscalingConfig),
    )


AutoscalingSection = _autoscaling_section()

#: engine flags a fleet file may not set: the provider sets them per replica
_PROVIDER_FLAGS = frozenset(
    {"--host", "--port", "--port-file", "--exit-with-parent", "--admin-token",
     "--served-model-name", "--version-label", "--api-key"}
)  # fmt: skip


@functools.cache
def _serve_flags() -> frozenset[str]:
    """Every option ``lmfleet serve`` takes (to catch a misspelt engine argument)."""
    import argparse

    from lmfleet.server.serve import add_serve_parser

    sub = argparse.ArgumentParser(add_help=False).add_subparsers()
    parser = add_serve_parser(sub)
    return frozenset(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def engine_flags(args: Mapping[str, Any] | Sequence[str]) -> tuple[str, ...]:
    """``engine_args`` as ``lmfleet serve`` flags: a mapping ``{dtype: float32,
    enforce-eager: true}`` becomes ``--dtype float32 --enforce-eager`` (false leaves
    a switch out); a list is taken as flags already.
    ``ValueError`` naming the key for a flag ``lmfleet serve`` does not have."""
    if isinstance(args, Mapping):
        flags: list[str] = []
        for key, value in args.items():
            flag = "--" + str(key).removeprefix("--").replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list | dict):
                raise ValueError(f"engine_args.{key}: give one value, not {value!r}")
            else:
                flags += [flag, str(value)]
    else:
        flags = [str(a) for a in args]
    for f in flags:
        name = f.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        if name in _PROVIDER_FLAGS:
            raise ValueError(f"{name} is set by lmfleet for each replica; leave it out")
        if name not in _serve_flags():
            raise ValueError(f"{name} is not an option of lmfleet serve (see lmfleet serve --help)")
    return tuple(flags)


class VersionConfig(_Section):
    name: str = Field(min_length=1)
    weight: float = 1.0
    #: what a managed replica runs (``lmfleet serve MODEL``): a checkpoint directory,
    #: a GGUF file, ``sim:PROFILE`` or a built-in name (``default``)
    model: str | None = None
    #: the rest of its ``lmfleet serve`` flags, as a mapping (``{dtype: float32}``)
    #: or a list (``["--dtype", "float32"]``)
    engine_args: dict[str, Any] | list[str] = Field(default_factory=dict)
    #: environment variables of each managed replica (e.g. OMP_NUM_THREADS)
    env: dict[str, str] = Field(default_factory=dict)
    replicas: ReplicaCounts = Field(default_factory=ReplicaCounts)
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)  # type: ignore[valid-type]
    #: a managed replica not READY this long after its start is replaced
    load_timeout_s: float = Field(600.0, gt=0)
    #: how long a drained replica's running requests may take to finish
    drain_timeout_s: float = Field(60.0, gt=0)
    #: replicas run outside lmfleet, routed to as they are
    urls: list[str] = Field(default_factory=list)
    #: the model name the replicas serve, when it differs from the fleet's name
    served_model_name: str | None = None
    #: the replicas' API key (their ``--api-key``), sent as ``Authorization: Bearer``
    #: on generation and tokenize calls; or the environment variable holding it
    api_key: str | None = None
    api_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _url_list(cls, data: Any) -> Any:
        """``replicas: [URL, ...]`` (files from before managed versions) means ``urls``."""
        if isinstance(data, Mapping) and isinstance(data.get("replicas"), list):
            data = dict(data)
            if data.get("urls"):
                raise ValueError("give static replicas once: as urls (replicas is {min, max})")
            urls = data.pop("replicas")
            for i, url in enumerate(urls):
                try:
                    check_replica_url(url)
                except ValueError as exc:
                    raise ValueError(f"replicas[{i}]: {exc}") from None
            data["urls"] = urls
        return data

    @model_validator(mode="after")
    def _managed(self) -> VersionConfig:
        if self.model is None and self.engine_args:
            raise ValueError("engine_args needs a model to run (model: ...)")
        self.serve_args()  # a misspelt flag is an error of the file
        if self.model is not None:
            self.policy_config()
        return self

    def serve_args(self) -> tuple[str, ...]:
        return engine_flags(self.engine_args)

    def policy_config(self) -> AutoscalingConfig | KedaConfig:
        """The config of this version's policy (``autoscaling.policy``); ``ValueError``
        saying what is wrong with a knob."""
        try:
            if self.autoscaling.policy == "keda":
                if self.replicas.standby:
                    raise ValueError(
                        "replicas.standby: policy keda keeps no standby (KEDA never sleeps "
                        "a replica); set standby: 0 or use policy lmfleet"
                    )
                section = self.autoscaling.keda
                knobs = section.model_dump() if section is not None else {}
                return KedaConfig(
                    min_replicas=self.replicas.min, max_replicas=self.replicas.max, **knobs
                )
            knobs = self.autoscaling.model_dump(exclude={"enabled", "policy", "keda"})
            return AutoscalingConfig(
                min_replicas=self.replicas.min, max_replicas=self.replicas.max,
                standby=self.replicas.standby, **knobs,
            )  # fmt: skip
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @property
    def managed(self) -> bool:
        return self.model is not None

    def upstream_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number ≥ 0, got {v}")
        if v < 0:
            raise ValueError("must be ≥ 0")
        return v

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        return [check_replica_url(u) for u in urls]


class RolloutStepConfig(_Section):
    #: the candidate's share of traffic during this step, in percent (the baseline
    #: gets the rest)
    weight: float = Field(gt=0, le=100)
    #: candidate requests the step must see before the next one ...
    min_requests: int = Field(100, ge=0)
    #: ... and how long it must last
    min_duration_s: float = Field(60.0, ge=0)


class RolloutConfig(_Section):
    """A progressive rollout (:mod:`lmfleet.gateway.rollout`); started from the admin
    API, or at start-up when ``start: true``."""

    baseline: str
    candidate: str
    steps: list[RolloutStepConfig] = Field(min_length=1)
    max_error_rate_increase: float = Field(0.01, ge=0)
    max_ttft_p90_ratio: float = Field(1.5, gt=0)
    max_tpot_p90_ratio: float = Field(1.5, gt=0)
    #: end-to-end latency, the one figure every answer has (streamed or not)
    max_e2e_p90_ratio: float = Field(1.5, gt=0)
    min_samples_for_judgement: int = Field(100, ge=1)
    #: of the intervals a step is judged on (see ``lmfleet.gateway.rollout``)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    start: bool = False

    @field_validator("steps")
    @classmethod
    def _baseline_first(cls, steps: list[RolloutStepConfig]) -> list[RolloutStepConfig]:
        if steps and steps[0].weight >= 100:
            raise ValueError(
                "the first step must stay below 100 so that the baseline takes traffic to "
                "judge the candidate against (e.g. weights 5, 25, 50, 100)"
            )
        for i in range(1, len(steps)):
            if steps[i].weight < steps[i - 1].weight:
                raise ValueError(f"steps[{i}].weight is below the previous step's")
        return steps


class ModelConfig(_Section):
    name: str = Field(min_length=1)
    versions: list[VersionConfig] = Field(min_length=1)
    balancing: BalancingConfig = Field(default_factory=BalancingConfig)
    stickiness: StickinessConfig = Field(default_factory=StickinessConfig)
    shadow: ShadowConfig | None = None
    queue: QueueConfig = Field(default_factory=QueueConfig)
    rollout: RolloutConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        names = [v.name for v in self.versions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"version names must be unique; repeated: {', '.join(dup)}")
        if self.shadow is not None and self.shadow.version not in names:
            raise ValueError(f"shadow.version {self.shadow.version!r} is not one of {names}")
        if self.rollout is not None:
            for role in ("baseline", "candidate"):
                if getattr(self.rollout, role) not in names:
                    raise ValueError(
                        f"rollout.{role} {getattr(self.rollout, role)!r} is not one of {names}"
                    )
        return self

    def version(self, name: str) -> VersionConfig | None:
        return next((v for v in self.versions if v.name == name), None)


class ApiKeyConfig(_Section):
    #: the key itself, or the name of an environment variable holding it (``key_env``)
    key: str | None = None
    key_env: str | None = None
    name: str = "default"
    #: requests per minute; None = unlimited
    rpm: float | None = Field(None, gt=0)
    #: tokens (prompt + completion) per minute; None = unlimited
    tpm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of 'key' and 'key_env'")
        return self

    def secret(self) -> str:
        if self.key is not None:
            return self.key
        value = os.environ.get(self.key_env or "")
        if not value:
            raise ConfigError(
                f"api key {self.name!r}: environment variable {self.key_env} is unset"
            )
        return value


class TimeoutsConfig(_Section):
    connect_s: float = Field(5.0, gt=0)
    #: from sending a request to the replica's response headers
    first_byte_s: float = Field(60.0, gt=0)
    #: longest silence between two chunks of a stream; then the replica counts as dead
    idle_s: float = Field(30.0, gt=0)
    #: a whole non-streaming request
    total_s: float = Field(600.0, gt=0)


class RetryConfig(_Section):
    #: attempts per request (1 = no retry)
    max_attempts: int = Field(3, ge=1)
    #: retries allowed as a fraction of requests (Envoy's retry budget), plus ...
    budget_ratio: float = Field(0.2, ge=0)
    #: ... this many retries per second whatever the traffic
    min_retries_per_s: float = Field(10.0, ge=0)
    #: resumes of one stream on another replica after a mid-stream failure
    max_resumes: int = Field(2, ge=0)


class GatewayConfig(_Section):
    admin_token: str | None = None
    admin_token_env: str | None = None
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    #: seconds between two polls of a replica's /state
    poll_interval_s: float = Field(0.5, gt=0)
    #: put prompt text in log lines (off: only ids and sizes are logged)
    log_prompts: bool = False

    def admin_secret(self) -> str | None:
        if self.admin_token is not None:
            return self.admin_token
        if self.admin_token_env:
            return os.environ.get(self.admin_token_env) or None
        return None


class ProviderConfig(_Section):
    """Who runs managed replicas: ``local`` (child ``lmfleet serve`` processes on
    this machine; ``kubernetes`` comes with ``lmfleet deploy``)."""

    kind: Literal["local"] = "local"
    #: where replica logs, port and pid files go (default: a directory under
    #: $LMFLEET_HOME/run named after the fleet)
    run_dir: str | None = None
    #: the address replicas bind (and the gateway connects to)
    host: str = "127.0.0.1"
    #: liveness poll of a started replica
    poll_interval_s: float = Field(1.0, gt=0)
    #: how long beyond its drain timeout a replica may take to exit before SIGKILL
    kill_grace_s: float = Field(10.0, gt=0)


class AutoscalerConfig(_Section):
    #: seconds between two decisions (the reaction time to a burst)
    interval_s: float = Field(2.0, gt=0)
    #: decide and log, but start, wake, sleep and stop nothing
    dry_run: bool = False
    #: decisions kept for ``GET /admin/autoscaler``
    history: int = Field(256, ge=1)


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(min_length=1)
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)

    @model_validator(mode="after")
    def _unique_models(self) -> FleetConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def managed(self) -> list[tuple[ModelConfig, VersionConfig]]:
        """The versions whose replicas the autoscaler runs."""
        return [(m, v) for m in self.models for v in m.versions if v.managed]


# ---- loading -------------------------------------------------------------------------------
def loc_path(loc: Sequence[str | int]) -> str:
    """``("models", 0, "versions", 1, "weight")`` → ``models[0].versions[1].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.startswith(("function-", "literal")):
            continue  # pydantic's name of a union member or validator, not a key
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err.get("type") == "extra_forbidden":
        return "unknown key (check the spelling)"
    if err.get("type") == "greater_than_equal":
        return f"must be ≥ {err.get('ctx', {}).get('ge')}"
    if err.get("type") == "greater_than":
        return f"must be > {err.get('ctx', {}).get('gt')}"
    if err.get("type") == "less_than_equal":
        return f"must be ≤ {err.get('ctx', {}).get('le')}"
    return msg


def format_errors(exc: ValidationError) -> list[str]:
    """One line per error: ``path: message``."""
    return [f"{loc_path(e['loc'])}: {_message(e)}" for e in exc.errors()]


def parse_config(data: Any, *, source: str = "fleet config") -> FleetConfig:
    """Validate a parsed YAML/JSON document; :class:`ConfigError` lists every error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    try:
        return FleetConfig.model_validate(dict(data))
    except ValidationError as exc:
        lines = format_errors(exc)
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> FleetConfig:
    import yaml

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the fleet config {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{p} is nested too deeply to be a fleet file") from None
    return parse_config(data, source=str(p))
