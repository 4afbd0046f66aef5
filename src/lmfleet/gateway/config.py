"""The fleet file the gateway reads: models, their versions and replicas, traffic
weights, stickiness, shadow traffic, balancing, queue limits, API keys, timeouts.

Validated with pydantic at load time; every error is reported by its path in the
file (``models[0].versions[1].weight: must be ≥ 0``) by :func:`format_errors`, so
the message shows where to fix it. Unknown keys are errors (a typo is never a
silently ignored setting). Sections other tools own (``autoscaler``, ``provider``,
``deploy``) are accepted as they are and not looked at here.

Replica lists are only the starting point: :mod:`lmfleet.gateway.registry` adds and
removes replicas at run time (the autoscaler does), without touching this file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class VersionConfig(_Section):
    name: str = Field(min_length=1)
    weight: float = 1.0
    replicas: list[str] = Field(default_factory=list)
    #: the model name the replicas serve, when it differs from the fleet's name
    served_model_name: str | None = None
    #: the replicas' API key (their ``--api-key``), sent as ``Authorization: Bearer``
    #: on generation and tokenize calls; or the environment variable holding it
    api_key: str | None = None
    api_key_env: str | None = None

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

    @field_validator("replicas")
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


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(min_length=1)
    # owned by other components: accepted here, validated there
    autoscaler: dict[str, Any] | None = None
    provider: dict[str, Any] | None = None
    deploy: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unique_models(self) -> FleetConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


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
